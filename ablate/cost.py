"""Cost profile of a model: params, forward MACs, throughput, latency, training speed, memory.

Measured honestly: warm-up before timing, the device synchronized around every timed
region, and the device, dtype and batch size reported with every number.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ablate.errors import compile_failures

METRICS = ("params", "gmacs", "throughput_img_s", "latency_ms", "train_img_s", "peak_mem_mb",
           "throughput_img_s_iqr", "latency_ms_iqr", "train_img_s_iqr", "compile_s")
REPEATS = 5  # timed repeats of every timing metric (its median is reported, and the IQR)
# the settings `train.precision: auto` / `train.channels_last: auto` choose among
CANDIDATES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(Q K^T) V: FlopCounterMode counts nothing for the CPU SDPA kernel."""
    *bh, lq, e = q_shape
    lk, ev = k_shape[-2], v_shape[-1]
    n = 1
    for d in bh:
        n *= d
    return 2 * n * lq * lk * (e + ev)


def _sdpa_ops() -> dict:
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_attention_math"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = _sdpa_flops
    return ops


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, image_size: int, in_chans: int = 3) -> float:
    """Forward multiply-accumulates per image, in billions (every matmul and conv counted)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, image_size, image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_sdpa_ops()) as fc:
            model(x)
    finally:
        model.train(was_training)
    return fc.get_total_flops() / 2 / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _first_call(fn, device: torch.device, eager) -> float:
    """Seconds of a compiled model's first call, synchronized: its compile; a backend that
    fails says so in one line (CompileError), unless `eager` (the same call on the model
    itself) fails too: then the model's own error; out of memory stays
    torch.OutOfMemoryError."""
    _sync(device)
    start = time.perf_counter()
    with compile_failures(eager=eager):
        fn()
    _sync(device)
    return time.perf_counter() - start


def _time_calls(fn, device: torch.device, warmup: int, min_iters: int,
                min_seconds: float, repeats: int = REPEATS) -> list[float]:
    """Seconds per call of each of `repeats` timed blocks, after `warmup` calls; a block is
    at least `min_iters` calls and `min_seconds / repeats` seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while n < min_iters or time.perf_counter() - start < min_seconds / repeats:
            fn()
            n += 1
            if n >= 1000:
                break
        _sync(device)
        out.append((time.perf_counter() - start) / n)
    return out


def median_iqr(values: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of repeated measurements."""
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[1]), float(q[2] - q[0])


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_reader():
    """glibc's bytes in use (malloc'd + mmap'd), or None where mallinfo2 is missing."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        fn = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _Mallinfo2

    def read() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return read


class _PeakHeap(TorchDispatchMode):
    """Samples heap bytes in use after every aten op: the CPU has no allocator statistics."""

    def __init__(self, read) -> None:
        super().__init__()
        self.read, self.peak = read, read()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.read())
        return out


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                 if p.grad is not None)
    for state in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values()
                     if torch.is_tensor(v))
    return total


@contextlib.contextmanager
def _train_mode(model: nn.Module, train: bool) -> Iterator[None]:
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to `n` inside (None: left as they are)."""
    if n is None:
        yield
        return
    was = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)


@dataclass
class Profile:
    params: int
    gmacs: float
    throughput_img_s: float | None
    latency_ms: float | None
    train_img_s: float | None
    peak_mem_mb: float | None
    device: str
    dtype: str
    batch_size: int
    image_size: int
    throughput_img_s_iqr: float | None = None
    latency_ms_iqr: float | None = None
    train_img_s_iqr: float | None = None
    repeats: int = REPEATS
    compile_s: float | None = None  # compiled profiles: the first call of each timed shape
    train_batch_size: int | None = None  # the training step's batch (train_img_s, peak_mem_mb)
    train_threads: int | None = None  # ... and the threads it was timed with

    def metrics(self) -> dict[str, float]:
        """The numeric metrics only (what is logged to MLflow)."""
        return {k: float(v) for k, v in asdict(self).items() if k in METRICS and v is not None}

    def as_dict(self) -> dict:
        return asdict(self)


def _train_step(model: nn.Module, x: torch.Tensor, num_classes: int, device: torch.device,
                dtype: torch.dtype, opt: torch.optim.Optimizer | None = None,
                grad_clip: float | None = None):
    """(one AdamW training step at lr 0 as the trainer takes it, its optimizer: `opt`, or a
    new one): fp16's loss scaling on CUDA, and the gradients clipped to norm `grad_clip`
    (`train.grad_clip`: a pass over every gradient that the trials pay each step)."""
    y = torch.randint(0, num_classes, (x.shape[0],), device=device)
    # fused on CUDA, as the trainer's (the default there, foreach, holds a parameter-sized
    # temporary through the step: another peak memory and another speed)
    opt = opt or torch.optim.AdamW(model.parameters(), lr=0.0,
                                   fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16
                                  and device.type == "cuda")

    def step() -> None:
        with _autocast(device, dtype):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)  # as the trainer does
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(opt)
        scaler.update()

    return step, opt


def _input(batch_size: int, in_chans: int, image_size: int, device: torch.device,
           channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.randn(batch_size, in_chans, image_size, image_size, device=device).to(
        memory_format=fmt)


def profile(model: nn.Module, image_size: int, in_chans: int = 3, num_classes: int = 1000,
            batch_size: int = 64, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, timing: bool = True, channels_last: bool = False,
            min_seconds: float = 1.0, warmup: int = 3, repeats: int = REPEATS,
            compile_: bool = False, train_batch_size: int | None = None,
            train_threads: int | None = None, grad_clip: float | None = None) -> Profile:
    """Measure a model's cost on `device`: params and MACs counted exactly; every timing
    metric the median of `repeats` timed blocks after warm-up, with its IQR. The model's
    weights are left unchanged.

    `compile_`: time the model as a `train.compile: true` trial runs it, torch.compile'd
    (dynamo's caches reset first: a reused worker past its recompile limit would time eager
    code), every shape static, as a trial's training graph is (its first call trains at its
    batch); `compile_s` is the first call of each timed shape (eval batch, batch 1, training
    step), compile included. On CPU the peak memory is still an eager step's: the heap is
    sampled after every aten op, and compiled kernels are not aten ops.

    `train_batch_size` / `train_threads`: the batch and (CPU) thread count of the training
    step behind `train_img_s` and `peak_mem_mb`, the trials' own (default: `batch_size` and the
    caller's threads); throughput and latency are timed at `batch_size` with the caller's.
    `grad_clip`: the trials' `train.grad_clip`, which their step pays for (None: no clipping)."""
    device = torch.device(device)
    repeats = max(REPEATS, repeats)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = count_params(model)
    gmacs = count_gmacs(model, image_size, in_chans)
    thr = lat = train = peak = compile_s = None
    iqr: dict[str, float] = {}
    if timing:
        run = model
        if compile_:
            torch._dynamo.reset()
            # static: after the eval batch and batch 1, dynamo's default would compile the
            # training step for any batch size, slower kernels than a trial's training graph
            run, compile_s = torch.compile(model, dynamic=False), 0.0
        x = _input(batch_size, in_chans, image_size, device, channels_last)
        x1 = x[:1].clone()
        with _train_mode(model, False), torch.no_grad(), _autocast(device, dtype):
            if compile_:
                compile_s += _first_call(lambda: run(x), device, lambda: model(x)) + \
                    _first_call(lambda: run(x1), device, lambda: model(x1))
            thr, iqr["throughput_img_s_iqr"] = median_iqr(
                [batch_size / t for t in _time_calls(lambda: run(x), device, warmup, 1,
                                                     min_seconds, repeats)])
            lat, iqr["latency_ms_iqr"] = median_iqr(
                [1000 * t for t in _time_calls(lambda: run(x1), device, warmup, 2,
                                               min_seconds / 2, repeats)])
        # on the host: a copy on a GPU would count in its peak below, weights twice over
        saved = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        try:
            xt = x if train_batch_size in (None, batch_size) else _input(
                train_batch_size, in_chans, image_size, device, channels_last)
            x = x1 = None  # a GPU's peak below counts what is allocated: the step's own only
            step, opt = _train_step(run, xt, num_classes, device, dtype, grad_clip=grad_clip)
            with _train_mode(model, True), _threads(train_threads):
                if compile_:
                    compile_s += _first_call(step, device, lambda: _train_step(
                        model, xt, num_classes, device, dtype, opt, grad_clip)[0]())
                train, iqr["train_img_s_iqr"] = median_iqr(
                    [len(xt) / t for t in _time_calls(step, device, warmup, 1, min_seconds,
                                                      repeats)])
                if compile_ and device.type != "cuda":  # the heap sampler sees aten ops only
                    step = _train_step(model, xt, num_classes, device, dtype, opt, grad_clip)[0]
                peak = _peak_train_memory(model, opt, step, device)
        except Exception as e:
            with contextlib.suppress(AttributeError):  # which batch: what a caller names
                e.in_training_step = True  # type: ignore[attr-defined]
            raise
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        if compile_:
            torch._dynamo.reset()  # the compiled graphs hold the model's weights: free them
    return Profile(params, gmacs, thr, lat, train, peak, str(device),
                   str(dtype).replace("torch.", ""), batch_size, image_size, repeats=repeats,
                   compile_s=compile_s,
                   train_batch_size=(train_batch_size or batch_size) if timing else None,
                   train_threads=(train_threads or torch.get_num_threads()) if timing else None,
                   **iqr)


def supported_candidates(device: str | torch.device) -> list[tuple[str, bool]]:
    """The (precision, channels_last) settings `auto` may pick on `device`: bf16 only where
    the device has bf16 kernels (a CUDA GPU that supports it; a CPU with AVX-512 or AMX,
    torch's oneDNN check: elsewhere bf16 is emulated, ten times slower and not worth a probe)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:  # native only, not V100/T4's emulation (the argument is torch >= 2.4's)
            ok_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            ok_bf16 = torch.cuda.is_bf16_supported()
    else:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            ok_bf16 = bool(check()) if check is not None else True
        except (RuntimeError, AttributeError):
            ok_bf16 = True
    return [c for c in CANDIDATES if c[0] != "bf16" or ok_bf16]


def candidates_for(precision: str, channels_last: bool | str, device: str | torch.device
                   ) -> list[tuple[str, bool]]:
    """The settings a probe compares for `train.precision` / `train.channels_last`: every
    supported one where a field is `auto`, the given value where it is not."""
    precs = ([p for p, _ in supported_candidates(device)] if precision == "auto"
             else [precision])
    layouts = [False, True] if channels_last == "auto" else [bool(channels_last)]
    return [(p, c) for p in dict.fromkeys(precs) for c in layouts]


def probe_settings(model: nn.Module, image_size: int, in_chans: int = 3,
                   num_classes: int = 10, batch_size: int = 64,
                   device: str | torch.device = "cpu",
                   candidates: list[tuple[str, bool]] | None = None,
                   min_seconds: float = 0.3, warmup: int = 2, grad_clip: float | None = None
                   ) -> tuple[tuple[str, bool], dict[str, float]]:
    """The fastest training setting (precision, channels_last) of `candidates` (default:
    all the device supports) by a short timed probe, and each one's training img/s (median
    of `REPEATS` blocks; one block for a setting under half the best first block's speed) by
    `precision/contiguous|channels_last`. After each setting's warm-up and first block, the
    blocks are interleaved (A B A B ...), so drift on the machine hits every setting alike;
    one optimizer serves them all, its state moved to each setting's layout with the weights
    (no extra copy of the optimizer per setting). Weights are unchanged."""
    device = torch.device(device)
    candidates = candidates or supported_candidates(device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = model.to(device)
    steps, times = {}, {c: [] for c in candidates}
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    block = min_seconds / REPEATS  # about min_seconds per setting in all, at least a step a block

    def use(c: tuple[str, bool]) -> None:
        fmt = torch.channels_last if c[1] else torch.contiguous_format
        model.to(memory_format=fmt)
        model.zero_grad(set_to_none=True)
        for state in opt.state.values():  # AdamW's moments in the layout of their weights
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() == 4:
                    state[k] = v.contiguous(memory_format=fmt)

    with _train_mode(model, True):
        for c in candidates:
            use(c)
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[c[0]]
            x = _input(batch_size, in_chans, image_size, device, c[1])
            steps[c], _ = _train_step(model, x, num_classes, device, dtype, opt, grad_clip)
            times[c] += _time_calls(steps[c], device, warmup, 1, block, repeats=1)
        first = max(batch_size / t[0] for t in times.values())
        live = [c for c in candidates if batch_size / times[c][0] > first / 2]
        for _ in range(REPEATS - 1):  # a clear loser is not timed further
            for c in live:
                use(c)
                times[c] += _time_calls(steps[c], device, 0, 1, block, repeats=1)
    speeds = {c: median_iqr([batch_size / t for t in ts])[0] for c, ts in times.items()}
    model.to(memory_format=torch.contiguous_format)
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    best = max(speeds, key=lambda c: speeds[c])
    return best, {f"{p}/{'channels_last' if c else 'contiguous'}": v
                  for (p, c), v in speeds.items()}


def _peak_train_memory(model: nn.Module, opt, step, device: torch.device) -> float | None:
    """Peak MiB (2^20 bytes; the metric keeps its name peak_mem_mb) held during one training
    step: weights, grads, optimizer state, activations."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    read = _heap_reader()
    if read is None:
        return None
    base = read()
    with _PeakHeap(read) as meter:
        step()
    return (meter.peak - base + _state_bytes(model, opt)) / 2**20
