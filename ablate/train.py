"""One trial's training: AdamW, warm-up + cosine/one-cycle, label smoothing, clipping,
mixed precision, val every epoch, test at the end. Reports each epoch through a callback."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ablate.data import Batches, DataBundle, Split
from ablate.errors import DivergedError, NoCudaDevice, compile_failures
from ablate.models import create_model
from ablate.models.backbone import DropPath
from ablate.study import TrainSpec, TrialSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, stream: str) -> int:
    """A seed for one named random stream of a trial, independent of the trial's others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "big") >> 1


class SeedRNG:
    """A seed's own global random state (torch CPU and CUDA, numpy, random).

    Seeds trained in lock-step in one process take turns; each turn runs inside `active()`,
    which swaps this seed's state in and the caller's back out, so whatever draws from the
    global generators (a third-party dropout, a timm model) sees only its own seed's numbers.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        saved = self._get()
        seed_everything(seed)
        self.state = self._get()
        self._set(saved)

    def _get(self) -> tuple:
        return (torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None,
                np.random.get_state(), random.getstate())

    def _set(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1])
        np.random.set_state(state[2])
        random.setstate(state[3])

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)


def build_model(trial: TrialSpec, image_size: int, channels: int, num_classes: int
                ) -> nn.Module:
    """A trial's model, its initial weights a function of the trial's seed alone."""
    kwargs = trial.model.model_dump(exclude={"match"})  # match chose dim/depth already
    arch = kwargs.pop("arch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trial.seed)
        return create_model(arch, image_size=image_size, in_chans=channels,
                            num_classes=num_classes, **(kwargs if arch == "backbone" else {}))


def pick_device(gpus: float = 0.0) -> torch.device:
    """CUDA when the trial was given a GPU, else the CPU. A trial given a GPU that torch
    cannot use fails (NoCudaDevice) instead of training on the CPU."""
    if gpus > 0:
        require_cuda(f"resources.gpus_per_trial is {gpus:g}")
        return torch.device("cuda")
    return torch.device("cpu")


def require_cuda(why: str) -> None:
    """Raise NoCudaDevice, saying `why` a GPU was expected, unless torch sees a CUDA device
    in this process (Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave it)."""
    if torch.cuda.is_available():
        return
    import os
    import socket

    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " (built without CUDA)")
    raise NoCudaDevice(
        f"{why}, but {build} sees no CUDA device on {socket.gethostname()} "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): the node declares "
        "a GPU to Ray that this process cannot use; fix its NVIDIA driver or CUDA install, or "
        "set resources.gpus_per_trial: 0 to run on CPUs")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=DTYPES[precision])


def is_auto(cfg: TrainSpec) -> bool:
    return cfg.precision == "auto" or cfg.channels_last == "auto"


def resolve_auto(cfg: TrainSpec, model: nn.Module, data: DataBundle, device: torch.device,
                 choice: tuple[str, bool] | None = None) -> TrainSpec:
    """`cfg` with `precision: auto` / `channels_last: auto` replaced: by `choice` (the
    architecture's profile probed it), else by a short probe here; explicit values stay."""
    if not is_auto(cfg):
        return cfg
    if choice is None:
        from ablate.cost import candidates_for, probe_settings

        cands = candidates_for(cfg.precision, cfg.channels_last, device)
        choice, _ = probe_settings(model, data.image_size, data.channels, data.num_classes,
                                   cfg.batch_size, device, cands,  # the batch it trains at
                                   min_seconds=cfg.profile_seconds, grad_clip=cfg.grad_clip)
    precision = choice[0] if cfg.precision == "auto" else cfg.precision
    channels_last = choice[1] if cfg.channels_last == "auto" else cfg.channels_last
    return cfg.model_copy(update={"precision": precision, "channels_last": channels_last})


def compiled(model: nn.Module, cfg: TrainSpec) -> nn.Module:
    """The model torch.compile'd when `train.compile` is true."""
    if not cfg.compile:
        return model
    with compile_failures():
        return torch.compile(model)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and position embeddings (the usual ViT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainSpec, steps_per_epoch: int
                  ) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total, pct_start=max(warm / total, 1e-3),
            anneal_strategy="cos", cycle_momentum=False)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def eval_batch(cfg: TrainSpec, device: torch.device) -> int:
    """Images per evaluation forward: `eval_batch_size`, and on a CPU at most `batch_size`
    too. A CPU runs the forward of a large batch slower per image once its activations
    outgrow the caches (the quickstart's models, one thread: 1.7x to 1.8x the time per image
    at 512 as at 64); the trial's own training batch is a size it already runs well. The
    result is the same up to float rounding (no layer mixes images in eval mode). A compiled
    model keeps `eval_batch_size`: at the training batch its evaluation would compile one more
    graph (a static one, then a dynamic one for the last batch), seconds each."""
    if device.type == "cuda" or cfg.compile:
        return cfg.eval_batch_size
    return min(cfg.eval_batch_size, cfg.batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, data: DataBundle, cfg: TrainSpec,
             device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a whole split, `eval_batch(cfg, device)` images
    per forward."""
    if len(split) == 0:
        return float("nan"), float("nan")
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in Batches(split, data.mean, data.std, eval_batch(cfg, device), device,
                        channels_last=cfg.channels_last):
        # compiled, evaluation compiles graphs of its own (no grad; a second batch size): a
        # compiler failure there is the same one line as in the first training step
        with compile_failures(cfg.compile), autocast(device, cfg.precision):
            logits = model(x)
        total_loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(split)
    return total_loss.item() / n, correct.item() / n


def round_steps(cfg: TrainSpec, batches_per_pass: int, n_train_full: int) -> int:
    """Optimizer steps between two evaluations. `epochs` budget: one pass over the trial's
    own subset. `steps` budget: one full-data epoch (ceil(n_full / batch size)) whatever the
    fraction, so every fraction takes the same steps, sees the same learning-rate curve and
    is validated at the same step counts."""
    if cfg.budget == "steps":
        return max(1, math.ceil(n_train_full / cfg.batch_size))
    return max(1, batches_per_pass)


def _eager_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                cfg: TrainSpec, device: torch.device) -> Callable[[], None]:
    """The first training step's forward and backward without torch.compile: what tells the
    model's own error from the compiler's when the compiled step fails."""
    def step() -> None:
        with autocast(device, cfg.precision):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _endless(batches: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pass after pass over a split, each pass reshuffled (a small subset under a `steps`
    budget makes several passes per evaluation)."""
    while True:
        yield from batches


def fit_epochs(model: nn.Module, data: DataBundle, cfg: TrainSpec, seed: int,
               device: torch.device | str = "cpu",
               final_extra: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    """Train epoch by epoch, yielding each epoch's metrics (the last also carries the final
    metrics). A generator, so that several seeds can train in lock-step: every random number
    a seed draws comes from its own generators, so its result does not depend on what trains
    beside it."""
    device = torch.device(device)
    if is_auto(cfg):
        raise ValueError("train.precision / train.channels_last 'auto' must be resolved "
                         "(train.resolve_auto) before training")
    rng = SeedRNG(seed, device)
    epochs = _fit_epochs(model, data, cfg, seed, device, final_extra)
    while True:
        with rng.active():
            try:
                metrics = next(epochs)
            except StopIteration:
                return
        yield metrics


def _fit_epochs(model: nn.Module, data: DataBundle, cfg: TrainSpec, seed: int,
                device: torch.device, final_extra: dict[str, float] | None
                ) -> Iterator[dict[str, float]]:
    drop_gen = torch.Generator(device=device).manual_seed(stream_seed(seed, "drop_path"))
    for m in model.modules():
        if isinstance(m, DropPath):
            m.generator = drop_gen
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    eager_model, model = model, compiled(model, cfg)
    train_batches = Batches(data.train, data.mean, data.std, cfg.batch_size, device,
                            shuffle=True, augment=cfg.augment, padding=cfg.crop_padding,
                            seed=seed, channels_last=cfg.channels_last,
                            drop_last=len(data.train) >= cfg.batch_size,
                            # a `steps` budget: a subset smaller than a batch still takes full
                            # batches, so every fraction sees the same images per step
                            fill=cfg.budget == "steps")
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            fused=device.type == "cuda" or None)
    steps_per_epoch = round_steps(cfg, len(train_batches), data.n_train_full or len(data.train))
    sched = make_schedule(opt, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    batches = _endless(train_batches)
    start = time.perf_counter()
    best, val_acc, train_time = float("nan"), float("nan"), 0.0  # best NaN: no val split
    steps, seen = 0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)
        for _ in range(steps_per_epoch):
            x, y = next(batches)
            # torch.compile compiles at the first call, and the backward at its first backward
            first = cfg.compile and seen == 0
            with compile_failures(first, _eager_step(eager_model, x, y, loss_fn, cfg, device)
                                  if first else None):
                with autocast(device, cfg.precision):
                    out = model(x)
                    loss = loss_fn(out.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.detach()
            seen += int(y.shape[0])
        steps += steps_per_epoch
        train_loss = loss_sum.item() / steps_per_epoch
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        if not math.isfinite(train_loss):
            raise DivergedError(f"diverged at epoch {epoch}: training loss is {train_loss}")
        val_loss, val_acc = evaluate(model, data.val, data, cfg, device)
        if not math.isfinite(val_loss) and len(data.val):
            raise DivergedError(f"diverged at epoch {epoch}: validation loss is {val_loss}")
        if math.isfinite(val_acc):
            best = val_acc if math.isnan(best) else max(best, val_acc)
        metrics: dict[str, float] = {"epoch": epoch, "train_loss": train_loss,
                                     "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                                     "epoch_time_s": epoch_time,
                                     # the x of the curves: the optimizer step under a steps
                                     # budget (fractions line up), else the epoch
                                     "curve_step": steps if cfg.budget == "steps" else epoch}
        if epoch == cfg.epochs:
            test_loss, test_acc = evaluate(model, data.test, data, cfg, device)
            final = {"val_acc": val_acc, "best_val_acc": best, "test_acc": test_acc,
                     "test_loss": test_loss, "train_time_s": train_time,
                     "train_images": float(len(data.train)), "train_steps": float(steps),
                     "train_images_seen": float(seen), **(final_extra or {})}
            metrics.update(final)
        yield metrics
        if (cfg.max_minutes is not None and epoch < cfg.epochs
                and time.perf_counter() - start > 60 * cfg.max_minutes):
            raise TimeoutError(f"exceeded train.max_minutes={cfg.max_minutes} after epoch "
                               f"{epoch} of {cfg.epochs}")


def fit(model: nn.Module, data: DataBundle, cfg: TrainSpec, seed: int,
        device: torch.device | str = "cpu",
        report: Callable[[dict[str, float]], None] | None = None,
        final_extra: dict[str, float] | None = None) -> dict[str, float]:
    """Train and evaluate; returns the final metrics. Raises DivergedError on a non-finite loss
    and TimeoutError past `cfg.max_minutes`.

    `report` gets every epoch's metrics; the last epoch's report also carries the final
    metrics (test accuracy and `final_extra`), so a scheduler sees exactly `epochs` reports."""
    metrics: dict[str, float] = {}
    for metrics in fit_epochs(model, data, cfg, seed, device, final_extra):
        if report is not None:
            report(metrics)
    return metrics
