"""Errors a user can fix. Every message names the file, the field and the fix."""

from __future__ import annotations


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


class DivergedError(RuntimeError):
    """Training produced a non-finite loss. Not a user error: the trial fails, the study goes on."""


def mask_url(url: str) -> str:
    """A URL with its password replaced by ***, for messages, logs and tags."""
    import re

    return re.sub(r"(://[^:/@\s]+:)[^@/\s]+@", r"\1***@", url)


class CompileError(RuntimeError):
    """torch.compile failed on this machine: say so and how to go on without it."""

    def __init__(self, e: BaseException | str) -> None:
        if isinstance(e, str):  # unpickled (a Ray task's error): already the message
            super().__init__(e)
            return
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        super().__init__(f"train.compile: torch.compile failed on this machine ({type(e).__name__}"
                         f": {first}); set train.compile: false")
