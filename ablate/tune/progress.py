"""The live progress line of a study: done / running / failed, best so far, ETA."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    total: int
    skipped: int
    done: int = 0
    pruned: int = 0
    failed: int = 0
    running: set[str] = field(default_factory=set)
    best: float | None = None
    best_name: str = ""
    started: float = field(default_factory=time.monotonic)
    durations: list[float] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return self.done + self.pruned + self.failed

    def eta_s(self, concurrency: int) -> float | None:
        left = self.total - self.ended
        if not self.durations or left <= 0:
            return None
        avg = sum(self.durations) / len(self.durations)
        return avg * left / max(1, concurrency)

    def line(self, concurrency: int) -> str:
        eta = self.eta_s(concurrency)
        best = f"best val_acc {self.best:.4f} ({self.best_name})" if self.best is not None else (
            "best -")
        eta_s = f"ETA {eta / 60:.1f} min" if eta is not None else "ETA -"
        return (f"done {self.done + self.pruned}/{self.total} (pruned {self.pruned}) | running "
                f"{len(self.running)} | failed {self.failed} | skipped {self.skipped} | {best} | "
                f"{eta_s} | {time.monotonic() - self.started:.0f}s")
