"""Training loop details that a study relies on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ablate.data import load_dataset
from ablate.errors import DivergedError
from ablate.models import create_model
from ablate.study import DatasetSpec, TrainSpec, load_study
from ablate.train import fit, make_schedule
from tests.conftest import write

DATA = DatasetSpec(image_size=16, train_size=200, test_size=40)


def model():
    return create_model(mixer="mlp", dim=16, depth=2, heads=2, patch_size=4, image_size=16,
                        num_classes=10)


def test_fit_reports_every_epoch_and_final_metrics_once():
    data = load_dataset(DATA)
    reports = []
    final = fit(model(), data, TrainSpec(epochs=3, batch_size=32), seed=0,
                report=reports.append, final_extra={"gmacs": 1.0})
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert "test_acc" not in reports[0] and "test_acc" in reports[-1]
    assert reports[-1]["gmacs"] == 1.0 and final["test_acc"] == reports[-1]["test_acc"]
    assert final["best_val_acc"] == max(r["val_acc"] for r in reports)
    assert final["train_images"] == len(data.train)


def test_small_models_learn_the_synthetic_task():
    """Clearly above chance (10%) and clearly below 100% after a few epochs."""
    data = load_dataset(DatasetSpec(image_size=32, train_size=2000, test_size=500))
    torch.manual_seed(0)
    m = create_model(mixer="conv", dim=48, depth=3, patch_size=4, image_size=32,
                     num_classes=10)
    final = fit(m, data, TrainSpec(epochs=4, batch_size=64, lr=2e-3, warmup_epochs=0.5),
                seed=0)
    assert 0.2 < final["test_acc"] < 0.9


def test_divergence_and_time_budget():
    data = load_dataset(DATA)
    with pytest.raises(DivergedError, match="diverged at epoch 1"):
        fit(model(), data, TrainSpec(epochs=2, batch_size=32, lr=1e12, grad_clip=None),
            seed=0)
    with pytest.raises(TimeoutError, match="exceeded train.max_minutes"):
        fit(model(), data, TrainSpec(epochs=3, batch_size=32, max_minutes=1e-6), seed=0)


def test_fp16_on_cpu_is_a_clear_error():
    data = load_dataset(DATA)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device; use bf16"):
        fit(model(), data, TrainSpec(epochs=1, precision="fp16"), seed=0)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedules_warm_up_then_decay(schedule):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    cfg = TrainSpec(epochs=10, lr=1.0, warmup_epochs=2, schedule=schedule)
    sched = make_schedule(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = max(range(100), key=lambda i: lrs[i])
    assert 15 <= peak <= 22  # the warm-up ends after 2 of 10 epochs
    assert lrs[0] < 0.2 and lrs[-1] < 0.05 and math.isclose(max(lrs), 1.0, rel_tol=0.02)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_seed_trains_the_same_alone_and_beside_another_seed(compiled):
    """Lock-step training (a search's seeds in one process) must not let seeds share random
    numbers: DropPath and augmentation draw from each seed's own generators. Compiled,
    DropPath draws from the global RNG (the seed's own, swapped in per turn): a draw from a
    generator broke the graph at every block, a slower program."""
    import json

    from torch._dynamo.utils import counters

    from ablate.study import load_study
    from ablate.tune.trainable import train_cell

    study_text = f"""\
name: lockstep
dataset: {{name: synthetic, image_size: 16, train_size: 128, test_size: 32}}
model: {{mixer: attention, dim: 16, depth: 2, heads: 2, patch_size: 4, drop_path: 0.2}}
train: {{epochs: 2, batch_size: 32, profile_batch_size: 4, profile_seconds: 0.01,
        augment: [crop, flip], compile: {str(compiled).lower()}}}
seeds: [0, 1]
"""
    counters.clear()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text(study_text)
        t0, t1 = load_study(path).trials
    ctx = {"root": None, "cpus": 1, "gpus": 0}

    def losses(cell, of=t0):
        reports = []
        train_cell({"context": ctx, "cell": [t.to_dict() for t in cell]}, reports.append)
        return [json.loads(r["per_seed"])[of.trial_id]["train_loss"] for r in reports]

    alone = losses([t0])
    assert len(alone) == 2
    assert losses([t1, t0]) == alone  # bit-identical, seed 1 trained first in every epoch
    assert losses([t0, t1]) == alone
    assert losses([t1], t1) != alone  # the other seed: other numbers
    if compiled:
        assert counters["stats"]["unique_graphs"] > 0  # it did compile
        assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_profiled_cell_logs_each_seeds_training_time_alone_from_its_profile(tmp_path):
    """Each seed's final metrics carry its images seen over the profile's train_img_s (the
    time alone on the profile node); a trial without a profile has none."""
    from ablate.tune.trainable import train_cell

    text = """\
name: alone
dataset: {name: synthetic, image_size: 16, train_size: 96, test_size: 16}
model: {mixer: pool, dim: 8, depth: 1, patch_size: 4}
train: {epochs: 2, batch_size: 16}
seeds: [0, 1]
"""
    cell = load_study(write(tmp_path / "s.yaml", text)).trials
    prof = {"metrics": {"train_img_s": 40.0, "gmacs": 0.001}, "precision": "fp32",
            "channels_last": False}
    threads = torch.get_num_threads()  # train_cell sets the trial's thread count
    try:
        for arch in ({t.trial_id: prof for t in cell}, None):
            ctx = {"root": None, "cpus": 1, "gpus": 0, "arch": arch, "profile": bool(arch)}
            reports: list = []
            train_cell({"context": ctx, "cell": [t.to_dict() for t in cell]}, reports.append)
            first, last = (json.loads(r["per_seed"]) for r in (reports[0], reports[-1]))
            assert all("train_time_alone_s" not in m for m in first.values())  # final only
            for t in cell:
                m = last[t.trial_id]
                if arch:
                    assert m["train_images_seen"] == 2 * 80  # 2 epochs of 5 batches of 16
                    assert m["train_time_alone_s"] == pytest.approx(160 / 40.0)
                else:
                    assert "train_time_alone_s" not in m
            if arch:
                assert reports[-1]["train_time_alone_s"] == pytest.approx(4.0)
                assert reports[-1]["gmacs"] == 0.001  # the profile's, not measured
    finally:
        torch.set_num_threads(threads)


def test_a_trial_without_a_profile_logs_what_it_resolved_auto_to(tmp_path):
    """A search trial whose architecture was not profiled up front probes `auto` itself, once
    for the seeds of its cell: what it chose reaches its run's params with its final metrics
    (the attempt that finished), so the verdict can name mixed precisions."""
    from mlflow import MlflowClient

    from ablate.cost import supported_candidates
    from ablate.tracking import Tracker
    from ablate.tracking.writer import RunWriter
    from ablate.tune.trainable import train_cell

    text = """\
name: resolve
dataset: {name: synthetic, image_size: 16, train_size: 64, test_size: 16}
model: {mixer: pool, dim: 8, depth: 1, patch_size: 4}
train: {epochs: 2, batch_size: 16, precision: auto, channels_last: auto, profile_seconds: 0.05,
        profile_batch_size: 8}
seeds: [0, 1]
"""
    study = load_study(write(tmp_path / "s.yaml", text))
    threads = torch.get_num_threads()
    ctx = {"root": None, "cpus": 1, "gpus": 0, "arch": None, "profile": True,
           "self_profile": True, "device_type": "cpu"}
    reports: list = []
    try:
        train_cell({"context": ctx, "cell": [t.to_dict() for t in study.trials]},
                   reports.append)
    finally:
        torch.set_num_threads(threads)
    first, last = (json.loads(r["per_seed"]) for r in (reports[0], reports[-1]))
    assert all("resolved_params" not in m for m in first.values())
    (got,) = {json.dumps(m["resolved_params"], sort_keys=True) for m in last.values()}
    got = json.loads(got)  # one choice for both seeds
    assert (got["train.precision_resolved"], got["train.channels_last_resolved"] == "True") in \
        supported_candidates("cpu")
    assert all(m["params"] > 0 for m in last.values())  # the parameter count is untouched

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = RunWriter(Tracker(uri, "resolve"), study)
    trial = study.trials[0]
    writer.start(trial)
    writer.result(trial.trial_id, first[trial.trial_id], 1)
    writer.result(trial.trial_id, last[trial.trial_id], 2)
    assert writer.flush() == []
    run = MlflowClient(uri).get_run(writer.runs[trial.trial_id].result())
    assert run.data.params["train.precision"] == "auto"
    assert run.data.params["train.precision_resolved"] == got["train.precision_resolved"]
    assert run.data.params["train.channels_last_resolved"] == got["train.channels_last_resolved"]


def _steps_and_lrs(fraction: float, budget: str) -> tuple[dict[str, float], list[float]]:
    """Train on a data fraction; record the learning rate of every optimizer step through
    torch's global optimizer step hook."""
    data = load_dataset(DatasetSpec(image_size=16, train_size=400, test_size=40,
                                    fraction=fraction))
    lrs: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        final = fit(model(), data, TrainSpec(epochs=3, batch_size=32, budget=budget), seed=0)
    finally:
        hook.remove()
    return final, lrs


def test_steps_budget_gives_every_fraction_the_same_steps_and_lr_curve():
    full, lr_full = _steps_and_lrs(1.0, "steps")
    quarter, lr_quarter = _steps_and_lrs(0.25, "steps")
    assert quarter["train_steps"] == full["train_steps"] == len(lr_full)
    assert lr_quarter == pytest.approx(lr_full, rel=1e-12)
    # a quarter of the data, so about four passes over it (within one batch of images)
    assert abs(quarter["train_images_seen"] - full["train_images_seen"]) <= 32
    assert quarter["train_images"] < full["train_images"] / 3


def test_steps_budget_gives_a_subset_smaller_than_a_batch_full_batches():
    """A 5% subset (18 images) with batch 32: each step takes all 18 in a new order and 14 of
    another, so it sees as many images per step as the full data (before: one batch of 18,
    same steps but 40% fewer images and another batch size); under `epochs` one pass is
    still one smaller batch."""
    full, _ = _steps_and_lrs(1.0, "steps")
    tiny, _ = _steps_and_lrs(0.05, "steps")
    assert tiny["train_images"] < 32
    assert tiny["train_steps"] == full["train_steps"]
    assert tiny["train_images_seen"] == 32 * tiny["train_steps"] == full["train_images_seen"]
    pass_, _ = _steps_and_lrs(0.05, "epochs")
    assert pass_["train_images_seen"] == 3 * pass_["train_images"]


def test_a_filled_batch_holds_every_image_of_the_small_split():
    from ablate.data import Batches

    data = load_dataset(DatasetSpec(image_size=16, train_size=400, test_size=40,
                                    fraction=0.05))
    n = len(data.train)
    batches = Batches(data.train, data.mean, data.std, 32, shuffle=True, seed=3, fill=True)
    assert len(batches) == 1
    for _ in range(2):  # each pass a new order
        (x, y), = list(batches)
        assert x.shape[0] == 32
        # every image of the split once, then some again: no label less often than in it
        have = torch.bincount(y, minlength=data.num_classes)
        need = torch.bincount(data.train.labels, minlength=data.num_classes)
        assert (have >= need).all() and have.sum() == 32
    assert n < 32


def test_epochs_budget_gives_a_smaller_fraction_proportionally_fewer_steps():
    full, _ = _steps_and_lrs(1.0, "epochs")
    quarter, _ = _steps_and_lrs(0.25, "epochs")
    for run in (full, quarter):  # one pass over its own subset per epoch (full batches only)
        assert run["train_steps"] == 3 * (run["train_images"] // 32)
    assert quarter["train_steps"] < 0.3 * full["train_steps"]
    assert quarter["train_images_seen"] == pytest.approx(3 * quarter["train_images"], abs=3 * 32)


def test_no_validation_split_gives_nan_val_metrics_not_a_fake_best():
    """val_fraction 0 (allowed only on request): best_val_acc is undefined (NaN), never -1."""
    data = load_dataset(DatasetSpec(image_size=16, train_size=200, test_size=40, val_fraction=0,
                                    allow_no_val=True))
    assert len(data.val) == 0
    final = fit(model(), data, TrainSpec(epochs=1, batch_size=32), seed=0)
    assert math.isnan(final["val_acc"]) and math.isnan(final["best_val_acc"])
    assert 0 <= final["test_acc"] <= 1


def test_compile_trains_a_tiny_model_for_one_epoch():
    data = load_dataset(DATA)
    final = fit(model(), data, TrainSpec(epochs=1, batch_size=32, compile=True), seed=0)
    assert math.isfinite(final["train_time_s"]) and 0.0 <= final["test_acc"] <= 1.0


def test_a_compile_failure_is_one_line_and_out_of_memory_stays_itself():
    """A backend that fails while compiling (dynamo wraps its error in BackendCompilerFailed)
    is one CompileError naming the backend's own error and the fix; out of memory, wrapped
    the same way, stays torch.OutOfMemoryError (the model does not fit: `compile: false`
    would not help)."""
    from ablate.errors import CompileError, compile_failures

    def compiled_with(error):
        def backend(gm, example_inputs):
            raise error
        return torch.compile(lambda x: torch.sin(x) + 1, backend=backend)

    torch._dynamo.reset()
    try:
        with pytest.raises(CompileError) as failed, compile_failures():
            compiled_with(RuntimeError("cc1plus: not found\nmore"))(torch.ones(3))
        msg = str(failed.value)
        assert "RuntimeError: cc1plus: not found" in msg and "more" not in msg
        assert msg.endswith("set train.compile: false")
        torch._dynamo.reset()
        with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"), \
                compile_failures():
            compiled_with(torch.OutOfMemoryError("CUDA out of memory. Tried 2 GiB"))(
                torch.ones(3))
        # dynamo's InternalTorchDynamoError keeps only the text; the CPU allocator's is plain
        from ablate.errors import out_of_memory

        for text in ("InternalTorchDynamoError: OutOfMemoryError: CUDA out of memory. x",
                     "[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 bytes",
                     "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED when calling x"):
            found = out_of_memory(RuntimeError(f"while compiling:\n{text}"))
            assert isinstance(found, torch.OutOfMemoryError) and str(found) == text
        assert out_of_memory(RuntimeError("cc1plus: not found")) is None
        with pytest.raises(ValueError), compile_failures(active=False):
            raise ValueError("not a compile: as it is")
        # the step's own error (the loss's, here) in a guarded first step is not the
        # compiler's: it passes as it is, not as "torch.compile failed; set compile: false"
        with pytest.raises(IndexError, match="Target 12 is out of bounds"), compile_failures():
            raise IndexError("Target 12 is out of bounds.")
        # an error raised `from None` while handling an out of memory is not one
        try:
            try:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried 2 GiB")
            except torch.OutOfMemoryError:
                raise RuntimeError("cc1plus: not found") from None
        except RuntimeError as e:
            assert out_of_memory(e) is None
    finally:
        torch._dynamo.reset()


class _ShapeBug(torch.nn.Module):
    """A model whose head does not fit its features (64 in, 65 expected)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 4, stride=4)
        self.head = torch.nn.Linear(65, 10)

    def forward(self, x):
        return self.head(self.stem(x).flatten(1))


def test_the_models_own_bug_met_while_compiling_is_the_models_error_not_a_compile_failure():
    """Dynamo meets a model's shape bug while it traces and raises its own TorchRuntimeError
    (a compiler failure by its class): the eager step decides, so the trial fails with the
    model's error, not with "set train.compile: false", which would not fix it. A compiler
    failure whose eager call runs stays a CompileError."""
    from ablate.errors import CompileError, compile_failures

    data = load_dataset(DATA)
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError) as failed:
            fit(_ShapeBug(), data, TrainSpec(epochs=1, batch_size=32, compile=True), seed=0)
        assert not isinstance(failed.value, CompileError)
        assert "64" in str(failed.value) and "65" in str(failed.value)  # the shapes
        assert any("model's own error" in n for n in failed.value.__notes__)
        # the failure reason a study records is still the error's own line, not the note
        import traceback

        from ablate.tune.callback import failure_reason

        reason = failure_reason("".join(traceback.format_exception(failed.value)))
        assert reason.startswith("RuntimeError: ") and "64" in reason and "65" in reason

        def backend(gm, example_inputs):
            raise RuntimeError("cc1plus: not found")

        torch._dynamo.reset()
        fn = torch.compile(lambda x: torch.sin(x) + 1, backend=backend)
        ran = []
        with pytest.raises(CompileError, match="cc1plus: not found"), \
                compile_failures(eager=lambda: ran.append(torch.sin(torch.ones(3)) + 1)):
            fn(torch.ones(3))
        assert len(ran) == 1  # the eager call ran, passed, and the compiler is to blame

        def compiles_itself():  # an eager step whose own failure is the compiler's
            raise torch._dynamo.exc.TorchRuntimeError("a submodule's own compile")

        torch._dynamo.reset()
        fn = torch.compile(lambda x: torch.sin(x) + 1, backend=backend)
        with pytest.raises(CompileError, match="cc1plus: not found"), \
                compile_failures(eager=compiles_itself):
            fn(torch.ones(3))
    finally:
        torch._dynamo.reset()


def test_compiler_failures_are_told_by_class_and_by_where_a_builtin_error_was_raised(tmp_path):
    """The compiler's errors are its classes, their subclasses (a base from dynamo counts),
    symbolic shapes' guards, and builtin errors (an assert, a lookup) raised in the
    compiler's own files; the same builtin errors raised elsewhere (the model's, torch.nn's)
    and a RuntimeError (how kernels report the model's errors) are not."""
    import os

    import torch._dynamo.exc as dynamo_exc
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    from ablate.errors import compiler_failure

    class Wrapped(dynamo_exc.TorchDynamoException):  # defined here: only its base is dynamo's
        pass

    def raised_in(path, error):
        try:
            exec(compile("raise error", path, "exec"), {"error": error})
        except BaseException as e:  # noqa: BLE001 - the raised error, with its traceback
            return e
        raise AssertionError("nothing raised")

    torch_dir = os.path.dirname(torch.__file__)
    inductor_file = os.path.join(torch_dir, "_inductor", "scheduler.py")
    functional_file = os.path.join(torch_dir, "nn", "functional.py")
    assert compiler_failure(Wrapped("x"))
    assert compiler_failure(GuardOnDataDependentSymNode(None, "data-dependent guard"))
    assert compiler_failure(raised_in(inductor_file, AssertionError("bad fusion")))
    assert compiler_failure(raised_in(inductor_file, KeyError("buf3")))
    try:  # the compiler's assert, wrapped as the cause of another builtin error
        raise ValueError("step failed") from raised_in(inductor_file, IndexError("x"))
    except ValueError as e:
        assert compiler_failure(e)
    assert not compiler_failure(raised_in(functional_file, IndexError("Target 12")))
    assert not compiler_failure(raised_in(__file__, AssertionError("model's own")))
    assert not compiler_failure(raised_in(inductor_file, RuntimeError("device-side assert")))
    assert not compiler_failure(AssertionError("no traceback"))
    # only the installed compiler's files: not a user's folder that happens to be named
    # like it, nor code compiled from a string
    lookalike = str(tmp_path / "triton" / "torch" / "_inductor" / "model.py")
    assert not compiler_failure(raised_in(lookalike, AssertionError("user code")))
    assert not compiler_failure(raised_in("<string>", AssertionError("eval'd")))
    # an error merely raised while the compiler's code handled its own lookup miss is not it
    try:
        try:
            raise raised_in(inductor_file, KeyError("cache miss"))
        except KeyError:
            raise ValueError("the model's own")  # noqa: B904 - implicit context, as intended
    except ValueError as e:
        assert isinstance(e.__context__, KeyError) and not e.__suppress_context__
        assert not compiler_failure(e)


def test_auto_resolves_to_a_supported_candidate_and_keeps_explicit_values():
    from ablate.cost import supported_candidates
    from ablate.train import resolve_auto

    data = load_dataset(DATA)
    auto = TrainSpec(precision="auto", channels_last="auto", profile_batch_size=8,
                     batch_size=16, profile_seconds=0.05)  # the probe times the training batch
    with pytest.raises(ValueError, match="must be resolved"):
        fit(model(), data, auto, seed=0)
    cfg = resolve_auto(auto, model(), data, torch.device("cpu"))
    assert (cfg.precision, cfg.channels_last) in supported_candidates("cpu")
    half = resolve_auto(auto.model_copy(update={"precision": "fp32"}), model(), data,
                        torch.device("cpu"))
    assert half.precision == "fp32" and isinstance(half.channels_last, bool)
    explicit = TrainSpec(precision="bf16", channels_last=True)
    assert resolve_auto(explicit, model(), data, torch.device("cpu")) is explicit
    assert fit(model(), data, cfg.model_copy(update={"epochs": 1}), seed=0)["test_acc"] >= 0


def test_the_probe_hands_the_model_back_as_it_found_it():
    """The auto probe trains (at lr 0) in every layout, interleaved: the weights, layout and
    gradients it hands back are the model's own."""
    from ablate.cost import probe_settings

    m = create_model(mixer="conv", dim=16, depth=2, patch_size=4, image_size=16,
                     num_classes=10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    best, speeds = probe_settings(m, 16, 3, 10, batch_size=8, min_seconds=0.05,
                                  candidates=[("fp32", False), ("fp32", True)])
    assert set(speeds) == {"fp32/contiguous", "fp32/channels_last"} and best[0] == "fp32"
    assert all(v > 0 for v in speeds.values())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(p.ndim == 4 for p in m.parameters())  # a layout to get wrong
    assert all(p.grad is None and p.is_contiguous() for p in m.parameters())


def test_compile_false_keeps_trial_ids_compile_true_changes_them(tmp_path):
    from ablate.study import validate_study

    base = {"name": "ids", "dataset": {"name": "synthetic"}, "factors": {}}
    off = validate_study(base, "ids.yaml").trials[0]
    on = validate_study({**base, "train": {"compile": True}}, "ids.yaml").trials[0]
    assert "compile" not in off.config["train"] and on.config["train"]["compile"] is True
    assert off.trial_id != on.trial_id


def test_a_cpu_evaluates_in_training_size_batches_with_the_same_result():
    """On a CPU the forward of eval_batch_size images at once runs slower per image than
    the training batch (the caches); `evaluate` takes at most `batch_size` there, and the
    loss and accuracy are those of one big batch."""
    from ablate.train import evaluate

    data = load_dataset(DATA)
    torch.manual_seed(0)
    m = model()
    sizes: list[int] = []
    m.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    cpu = torch.device("cpu")
    n = len(data.test)
    whole = evaluate(m, data.test, data, TrainSpec(batch_size=n, eval_batch_size=512), cpu)
    assert sizes == [n]
    sizes.clear()
    chunked = evaluate(m, data.test, data, TrainSpec(batch_size=16, eval_batch_size=512), cpu)
    assert sizes == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert chunked[1] == whole[1] and chunked[0] == pytest.approx(whole[0], rel=1e-5)
    sizes.clear()  # a smaller eval_batch_size still bounds it
    evaluate(m, data.test, data, TrainSpec(batch_size=16, eval_batch_size=8), cpu)
    assert max(sizes) == 8 and sum(sizes) == n
    # compiled, it keeps eval_batch_size: the training batch would compile one more graph
    from ablate.train import eval_batch

    assert eval_batch(TrainSpec(batch_size=16, eval_batch_size=512, compile=True), cpu) == 512


def test_a_compile_failure_met_first_in_evaluation_is_the_same_one_line(monkeypatch):
    """A compiled model compiles graphs of its own for evaluation (no grad, then a dynamic
    batch); only the first training step was guarded, so a compiler failure there came out
    as dynamo's multi-line BackendCompilerFailed after a whole epoch (helper-38)."""
    from ablate.errors import CompileError

    def backend(gm, example_inputs):
        if not torch.is_grad_enabled():  # training compiles; evaluation fails to
            raise RuntimeError("cc1plus: not found\nmore")
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend=backend))
    torch._dynamo.reset()
    try:
        with pytest.raises(CompileError) as failed:
            fit(model(), load_dataset(DATA), TrainSpec(epochs=1, batch_size=32, compile=True),
                seed=0)
    finally:
        torch._dynamo.reset()
    msg = str(failed.value)
    assert "RuntimeError: cc1plus: not found" in msg and "\n" not in msg
    assert msg.endswith("set train.compile: false")
