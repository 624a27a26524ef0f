"""Errors a user can fix. Every message names the file, the field and the fix."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator


class AblateError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits with code 2."""

    exit_code = 2

    def lines(self) -> list[str]:
        return [str(self)]


class StudyError(AblateError):
    """A study file is invalid; carries every problem found, one `file: path: message` each."""

    def __init__(self, file: str, problems: list[tuple[str, str]]):
        self.file = file
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.file}: {path}: {msg}" if path else f"{self.file}: {msg}"
                for path, msg in self.problems]


class DataError(AblateError):
    """A dataset cannot be found or read."""


class ModelError(AblateError):
    """A model configuration cannot be built."""


class TrackingError(AblateError):
    """The tracking store cannot be reached or written."""


class AnalysisError(AblateError):
    """Runs cannot be analysed: no such metric, no finished runs, nothing that varies."""


class ProfileFailed(AblateError):
    """A cost profile failed other than by compiling or out of memory (a bug, a dead node):
    the run stops before its trials, which would otherwise finish without their cost
    metrics for good. Not the study file's fault: exit code 1."""

    exit_code = 1


class NoCudaDevice(RuntimeError):
    """A trial or profile was given a GPU (resources.gpus_per_trial > 0) that torch cannot
    use in its process. Raised rather than train or time on the CPU under a GPU study's
    name, where every cost and every hour would be the CPU's."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss. Not a user error: the trial fails, the study goes on."""


def mask_url(url: str) -> str:
    """A URL with its password replaced by ***, for messages, logs and tags."""
    import re

    # as SQLAlchemy reads a URL: the password runs to the first @, `/` and all
    return re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", url)


class CompileError(RuntimeError):
    """torch.compile failed on this machine: say so and how to go on without it."""

    def __init__(self, e: BaseException | str) -> None:
        if isinstance(e, str):  # unpickled (a Ray task's error): already the message
            super().__init__(e)
            return
        e = getattr(e, "inner_exception", None) or e  # the backend's own, not dynamo's wrapper
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        super().__init__(f"train.compile: torch.compile failed on this machine ({type(e).__name__}"
                         f": {first}); set train.compile: false")


# what torch's out-of-memory errors say: wrapped by dynamo (the text only), CUDA's (the caching
# allocator's, a kernel launch's, cuBLAS's, Triton's), and the CPU allocator's (a RuntimeError)
OOM_TEXTS = ("OutOfMemoryError:", "CUDA out of memory", "CUDA error: out of memory",
             "CUBLAS_STATUS_ALLOC_FAILED", "Triton Error [CUDA]: out of memory",
             "DefaultCPUAllocator: can't allocate")


def _chain(e: BaseException, context: bool = True) -> list[BaseException]:
    """`e` and what it wraps: dynamo's `inner_exception`, `__cause__`, and (with `context`)
    `__context__` unless a `raise ... from` suppressed it (an error raised while handling
    another is not that other one)."""
    chain, stack = [], [e]
    while stack:
        x = stack.pop()
        if x is None or any(x is c for c in chain):
            continue
        chain.append(x)
        stack += [getattr(x, "inner_exception", None), x.__cause__,
                  None if x.__suppress_context__ or not context else x.__context__]
    return chain


def out_of_memory(e: BaseException) -> BaseException | None:
    """torch's out-of-memory error in `e` or what it wraps (dynamo re-raises a failure inside
    a compile as BackendCompilerFailed, keeping it as `inner_exception`, or as
    InternalTorchDynamoError, keeping only its text); None when there is none."""
    chain = _chain(e)
    for x in chain:
        if type(x).__name__ == "OutOfMemoryError" and type(x).__module__.startswith("torch"):
            return x
    for x in chain:  # only the text is left
        line = next((ln for ln in str(x).splitlines()
                     if any(m in ln for m in OOM_TEXTS)), None)
        if line is not None:
            import torch

            return torch.OutOfMemoryError(line.strip()[:300])
    return None


# where torch.compile's own errors come from: dynamo, inductor (its C++ and Triton builds),
# AOTAutograd (the backward's graph), symbolic shapes (torch.fx.experimental), Triton itself
COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch._functorch",
                    "torch.fx.experimental", "triton")
# the same code as installed files, for a builtin error raised there (functorch's eager vmap,
# grad and functional_call left out: only its AOTAutograd and partitioning are the compiler)
COMPILER_CODE = ("torch._dynamo", "torch._inductor", "torch._functorch._aot_autograd",
                 "torch._functorch.aot_autograd", "torch._functorch.partitioners",
                 "torch._functorch.compile_utils", "torch._functorch.compilers",
                 "torch._functorch._activation_checkpointing",
                 "torch._functorch._activation_offloading", "torch.fx.experimental", "triton")
_compiler_paths: tuple[str, ...] | None = None


def _of_compiler(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in COMPILER_MODULES)


def _compiler_code_paths() -> tuple[str, ...]:
    """The installed folders (a trailing separator) and files of COMPILER_CODE; a package
    that is not installed (Triton on a CPU-only torch) has none."""
    global _compiler_paths
    if _compiler_paths is None:
        import importlib.util

        paths = []
        for m in COMPILER_CODE:
            try:
                spec = importlib.util.find_spec(m)
            except Exception:  # noqa: BLE001 - called while handling a failure: never raise
                spec = None
            if spec is None or not spec.origin:
                continue
            origin = os.path.realpath(spec.origin)
            paths.append(os.path.dirname(origin) + os.sep if spec.submodule_search_locations
                         else origin)
        _compiler_paths = tuple(paths)
    return _compiler_paths


def _raised_in_compiler(x: BaseException) -> bool:
    """Whether the innermost frame of `x`'s traceback is the compiler's own installed code
    (not a generated kernel file, nor code compiled from a string)."""
    tb = x.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_code.co_filename
    if not name or name.startswith("<"):
        return False
    path = os.path.realpath(name)
    return any(path == p or (p.endswith(os.sep) and path.startswith(p))
               for p in _compiler_code_paths())


def compiler_failure(e: BaseException, context: bool = True) -> bool:
    """Whether torch.compile's machinery raised `e` or something it wraps: an error whose class
    (or a base of it) comes from the compiler's modules, or a builtin one other than
    RuntimeError (an assert, a lookup) raised in the compiler's own code and reached from `e`
    by what wraps it or what it was raised from (not by an error it was merely raised while
    handling); not the model's own error (a label out of range, a device-side assert) inside
    a compiled first step. A builtin RuntimeError counts only by its class's modules: it is
    how kernels report the model's errors, also when the innermost Python frame is
    inductor's or Triton's launcher. `context=False`: not what `e` was raised while handling
    (an eager re-run raised inside the compile failure's handling)."""
    return (any(any(_of_compiler(c.__module__) for c in type(x).__mro__)
                for x in _chain(e, context))
            or any(type(x).__module__ == "builtins" and not isinstance(x, RuntimeError)
                   and _raised_in_compiler(x) for x in _chain(e, context=False)))


@contextlib.contextmanager
def compile_failures(active: bool = True, eager: Callable[[], object] | None = None
                     ) -> Iterator[None]:
    """Inside, torch.compile's first call (and its backward): a failure of the compiler is one
    CompileError line with the fix, except out of memory, which stays torch.OutOfMemoryError
    (the model does not fit; compiling it is not what failed). Any other error (the loss's,
    the model's own at run time) passes unchanged.

    `eager`: the same call without torch.compile. A compiler failure runs it once: the
    model's own bug that dynamo met while tracing (a shape mismatch, raised as dynamo's
    TorchRuntimeError) fails there too, and its own error is raised instead, since
    `train.compile: false` would not fix it. Out of memory there says nothing of the model
    (the failed compile may still hold memory), nor does a compiler failure of the eager
    step itself (a part the model compiles on its own): the CompileError stands."""
    if not active:
        yield
        return
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any backend failure: one clear line
        oom = out_of_memory(e)
        if oom is not None:
            raise oom from None
        if not compiler_failure(e):
            raise
        if eager is not None:
            try:
                eager()
            except Exception as own:  # noqa: BLE001 - the model's own error, whatever it is
                # the eager step's own compiler failure (a submodule compiled by the model
                # itself), or out of memory, say nothing of the model: the CompileError stands
                if out_of_memory(own) is None and not compiler_failure(own, context=False):
                    # no colon: a trial's failure reason is the last line with one
                    own.add_note("(the model's own error, raised without torch.compile, "
                                 "which met it while compiling the model)")
                    raise own from None
        raise CompileError(e) from None


class ProfileOutOfMemory(RuntimeError):
    """A cost profile ran out of memory at the batch of `field` (train.batch_size for the
    auto probe and the training step, train.profile_batch_size for throughput and latency);
    crosses Ray's pickling."""

    def __init__(self, field: str, batch: int) -> None:
        super().__init__(field, batch)
        self.field, self.batch = field, batch

    def __str__(self) -> str:
        return f"out of memory at {self.field} = {self.batch}"
