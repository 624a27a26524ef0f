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

METRICS = ("params", "gmacs", "throughput_img_s", "latency_ms", "train_img_s", "peak_mem_mb")


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


def _time_calls(fn, device: torch.device, warmup: int, min_iters: int,
                min_seconds: float) -> float:
    """Seconds per call: warm up, then time at least `min_iters` calls and `min_seconds`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
        if n >= 1000:
            break
    _sync(device)
    return (time.perf_counter() - start) / n


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

    def metrics(self) -> dict[str, float]:
        """The numeric metrics only (what is logged to MLflow)."""
        return {k: float(v) for k, v in asdict(self).items() if k in METRICS and v is not None}

    def as_dict(self) -> dict:
        return asdict(self)


def profile(model: nn.Module, image_size: int, in_chans: int = 3, num_classes: int = 1000,
            batch_size: int = 64, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, timing: bool = True, channels_last: bool = False,
            min_seconds: float = 1.0, warmup: int = 3) -> Profile:
    """Measure a model's cost on `device`. The model's weights are left unchanged."""
    device = torch.device(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = count_params(model)
    gmacs = count_gmacs(model, image_size, in_chans)
    thr = lat = train = peak = None
    if timing:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch_size, in_chans, image_size, image_size, device=device).to(
            memory_format=fmt)
        x1 = x[:1].clone()
        with _train_mode(model, False), torch.no_grad(), _autocast(device, dtype):
            thr = batch_size / _time_calls(lambda: model(x), device, warmup, 3, min_seconds)
            lat = 1000 * _time_calls(lambda: model(x1), device, warmup, 5, min_seconds / 2)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        y = torch.randint(0, num_classes, (batch_size,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)

        def step() -> None:
            with _autocast(device, dtype):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()

        with _train_mode(model, True):
            train = batch_size / _time_calls(step, device, warmup, 2, min_seconds)
            peak = _peak_train_memory(model, opt, step, device)
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    return Profile(params, gmacs, thr, lat, train, peak, str(device),
                   str(dtype).replace("torch.", ""), batch_size, image_size)


def _peak_train_memory(model: nn.Module, opt, step, device: torch.device) -> float | None:
    """Peak MB held during one training step: weights, grads, optimizer state, activations."""
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
