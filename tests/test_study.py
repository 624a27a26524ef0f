"""Study files: validation errors (one test each), factor expansion and trial ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli import app
from ablate.errors import StudyError
from ablate.study import load_study, trial_id
from tests.conftest import ROOT, write

GOOD = """\
name: t
dataset: {name: synthetic, image_size: 32}
model: {dim: 32, depth: 2, heads: 2, patch_size: 4}
train: {epochs: 1}
factors:
  model.mixer: [attention, mlp]
seeds: [0, 1]
"""

runner = CliRunner()


def add_factor(line: str) -> str:
    """GOOD with one more factor line, e.g. `model.heads: [1, 2]`."""
    return GOOD.replace("seeds:", f"  {line}\nseeds:")


def snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def validate_cli(path: Path) -> tuple[int, str]:
    res = runner.invoke(app, ["validate", str(path)])
    return res.exit_code, res.output


def test_good_study_expands_factorial_times_seeds(tmp_path):
    s = load_study(write(tmp_path / "s.yaml", GOOD))
    assert len(s.trials) == 4
    assert {(t.factors["model.mixer"], t.seed) for t in s.trials} == {
        ("attention", 0), ("attention", 1), ("mlp", 0), ("mlp", 1)}
    assert len({t.trial_id for t in s.trials}) == 4
    code, out = validate_cli(tmp_path / "s.yaml")
    assert code == 0 and "4 trials" in out and "model.mixer: 2 levels" in out


BAD_CASES = {
    "empty": ("", "is empty"),
    "not_yaml": ("name: [unclosed\n  x: {", "not valid YAML"),
    "not_mapping": ("- a\n- b\n", "must be a YAML mapping"),
    "unknown_top": (GOOD + "bogus: 1\n", "bogus: unknown key"),
    "unknown_nested": (GOOD.replace("epochs: 1", "epochs: 1, batchsize: 64"),
                       "did you mean 'batch_size'"),
    "wrong_type": (GOOD.replace("epochs: 1", "epochs: ten"), "train.epochs"),
    "zero_epochs": (GOOD.replace("epochs: 1", "epochs: 0"), "train.epochs"),
    "neg_batch": (GOOD.replace("epochs: 1", "epochs: 1, batch_size: -4"), "train.batch_size"),
    "zero_dim": (GOOD.replace("dim: 32", "dim: 0"), "model.dim"),
    "neg_depth": (GOOD.replace("depth: 2", "depth: -1"), "model.depth"),
    "factor_no_field": (GOOD.replace("model.mixer:", "model.mixxer:"), "has no field 'mixxer'"),
    "factor_bad_section": (GOOD.replace("model.mixer:", "optim.lr:"), "not a dotted path"),
    "factor_empty": (GOOD.replace("[attention, mlp]", "[]"), "has no levels"),
    "factor_dup": (GOOD.replace("[attention, mlp]", "[mlp, mlp]"), "duplicate level"),
    "factor_bad_level": (GOOD.replace("model.mixer: [attention, mlp]",
                                      "model.dim: [32, ten]"), "factors.model.dim[1]"),
    "seeds_empty": (GOOD.replace("seeds: [0, 1]", "seeds: []"), "seeds: is empty"),
    "seeds_dup": (GOOD.replace("seeds: [0, 1]", "seeds: [1, 1]"), "duplicate seeds"),
    "patch_not_dividing": (GOOD.replace("patch_size: 4", "patch_size: 5"),
                           "does not divide the image size 32"),
    "too_many_tokens": (GOOD.replace("patch_size: 4", "patch_size: 8, tokens: 32"),
                        "exceed the 16 patches"),
    "tokenlearner_conv": (GOOD.replace("[attention, mlp]", "[conv]").replace(
        "patch_size: 4", "patch_size: 4, tokens: 8"), "removes the patch grid"),
    "tokenlearner_pool": (GOOD.replace("[attention, mlp]", "[pool]").replace(
        "patch_size: 4", "patch_size: 4, tokens: 8"), "removes the patch grid"),
    "tokenlearner_dual": (GOOD.replace("[attention, mlp]", "[dual]").replace(
        "patch_size: 4", "patch_size: 4, tokens: 8"), "removes the patch grid"),
    "kernel_factor_on_attention": (GOOD.replace("  model.mixer: [attention, mlp]\n",
                                                "  model.mixer: [attention, conv]\n"
                                                "  model.kernel_size: [3, 5]\n"),
                                   "model.kernel_size: is a factor but mixer 'attention' does "
                                   "not use it"),
    "fraction_zero": (GOOD.replace("image_size: 32", "image_size: 32, fraction: 0"),
                      "dataset.fraction"),
    "fraction_factor_big": (GOOD.replace("model.mixer: [attention, mlp]",
                                         "dataset.fraction: [0.5, 1.5]"),
                            "factors.dataset.fraction[1]"),
    "unset_var": (GOOD.replace("name: t", "name: t\ndescription: ${ABLATE_TEST_UNSET_VAR}"),
                  "ABLATE_TEST_UNSET_VAR is not set"),
    "python_tag": (GOOD + "x: !!python/object/apply:os.system ['echo hacked']\n",
                   "YAML tags that build Python objects are not allowed"),
    "unknown_mixer": (GOOD.replace("[attention, mlp]", "[attention, mpl]"),
                      "did you mean 'mlp'"),
    "fp16_without_gpu": (GOOD.replace("epochs: 1", "epochs: 1, precision: fp16"),
                         "fp16 needs a GPU"),
    "two_gpus_per_trial": (GOOD + "resources: {gpus_per_trial: 2}\n",
                           "resources.gpus_per_trial: is 2, but a trial trains on one GPU"),
    "cpe_on_identity": (GOOD.replace("[attention, mlp]", "[identity]").replace(
        "patch_size: 4", "patch_size: 4, pos_embed: cpe"), "model.pos_embed: cpe is a convolution"),
    "cpe_with_tokens": (GOOD.replace("patch_size: 4", "patch_size: 4, tokens: 4, pos_embed: cpe"),
                        "the TokenLearner removes it"),
    "even_pool_kernel": (GOOD.replace("  model.mixer: [attention, mlp]\n",
                                      "  model.mixer: [pool]\n  model.kernel_size: [3, 4]\n"),
                         "model.kernel_size: mixer 'pool': pooling keeps the grid's size only "
                         "with an odd kernel, not 4"),
    "fuser_after_last_block": (GOOD.replace(
        "patch_size: 4", "patch_size: 4, tokens: 4, token_learner_at: 2, token_fuser: true"),
        "the fuser would fuse nothing"),
    "heads_factor_on_mlp": (add_factor("model.heads: [1, 2]"),
                            "model.heads: is a factor but mixer 'mlp' does not use it: give "
                            "heads only to attention, dual"),
    "window_factor_on_attention": (add_factor("model.window_size: [2, 4]"),
                                   "model.window_size: is a factor but mixer 'attention'"),
    "token_mlp_ratio_factor_on_attention": (add_factor("model.token_mlp_ratio: [0.5, 1.0]"),
                                            "model.token_mlp_ratio: is a factor but mixer "
                                            "'attention'"),
    "token_learner_factor_without_tokens": (add_factor("model.token_learner_version: ['1.0']"),
                                            "model.tokens is not set, so there is no "
                                            "TokenLearner"),
    "dim_factor_on_timm": ("name: t\nmodel: {arch: 'timm:resnet18'}\n"
                           "factors: {model.dim: [64, 128]}\n",
                           "model.dim: is a factor but model.arch 'timm:resnet18' ignores it"),
    # helper-40: passed validation, then its profile stopped the whole run with exit 1
    "unknown_timm_model": ("name: t\nmodel: {arch: 'timm:resnet18x'}\n",
                           "model.arch: timm has no model 'resnet18x'; did you mean "
                           "'timm:resnet18'?"),
    "heads_factor_on_reference": ("name: t\nmodel: {arch: vit_tiny_patch16_224}\n"
                                  "factors: {model.heads: [3]}\n",
                                  "model.arch 'vit_tiny_patch16_224' ignores it"),
    "val_fraction_zero": (GOOD.replace("image_size: 32", "image_size: 32, val_fraction: 0"),
                          "dataset.val_fraction: 0 leaves no validation split"),
    "val_fraction_zero_factor": (add_factor("dataset.val_fraction: [0.1, 0]"),
                                 "factors.dataset.val_fraction[1]: 0 leaves no validation"),
    "val_fraction_zero_with_asha": (GOOD.replace(
        "image_size: 32", "image_size: 32, val_fraction: 0, allow_no_val: true")
        + "scheduler: {name: asha}\n", "but scheduler.metric val_acc selects on it"),
    # levels that would differ in more than the field (another synthetic set, another
    # validation split and steps budget): refused, one case per field
    **{f"{k}_factor": (add_factor(f"dataset.{k}: [100, 200]"),
                       f"factors.dataset.{k}: cannot be a factor")
       for k in ("train_size", "max_train", "test_size")},
    "odd_depth_dual": (GOOD.replace("[attention, mlp]", "[dual]").replace("depth: 2",
                                                                          "depth: 3"),
                       "must be even"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gets_one_line_error_and_writes_nothing(case, tmp_path, monkeypatch):
    monkeypatch.delenv("ABLATE_TEST_UNSET_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    text, expected = BAD_CASES[case]
    path = write(tmp_path / f"{case}.yaml", text)
    before = snapshot(tmp_path)
    code, out = validate_cli(path)
    assert code == 2, out
    assert expected in out, out
    assert "Traceback" not in out
    for line in out.strip().splitlines():
        assert line.startswith(f"{path}: "), line
    assert snapshot(tmp_path) == before


def test_missing_file_and_directory(tmp_path):
    code, out = validate_cli(tmp_path / "nope.yaml")
    assert code == 2 and "file not found" in out
    code, out = validate_cli(tmp_path)
    assert code == 2 and "is a directory" in out


def test_all_errors_are_reported_at_once(tmp_path):
    text = GOOD.replace("epochs: 1", "epochs: 0").replace("dim: 32", "dim: -1")
    with pytest.raises(StudyError) as ei:
        load_study(write(tmp_path / "s.yaml", text))
    paths = {p for p, _ in ei.value.problems}
    assert {"train.epochs", "model.dim"} <= paths


def test_env_vars_expand_with_default(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATE_TEST_DESC", "hello")
    monkeypatch.delenv("ABLATE_TEST_UNSET_VAR", raising=False)
    text = GOOD.replace("name: t", "name: t\ndescription: ${ABLATE_TEST_DESC} "
                                   "${ABLATE_TEST_UNSET_VAR:-world}")
    s = load_study(write(tmp_path / "s.yaml", text))
    assert s.spec.description == "hello world"


def test_union_of_grids_merges_duplicates(tmp_path):
    text = GOOD.replace("factors:\n  model.mixer: [attention, mlp]\n", """factors:
  - model.mixer: [attention, conv]
  - model.mixer: [conv]
    model.kernel_size: [3, 9]
""")
    s = load_study(write(tmp_path / "s.yaml", text))
    # conv with kernel 9 is conv's default: the same trial as grid 1's conv cell
    cells = {(t.factors["model.mixer"], t.factors["model.kernel_size"]) for t in s.trials}
    assert cells == {("attention", None), ("conv", 9), ("conv", 3)}
    assert len(s.trials) == 6


def test_trial_id_ignores_key_order_and_formatting(tmp_path):
    a = load_study(write(tmp_path / "a.yaml", GOOD))
    reordered = """\
seeds: [1, 0]
factors: {model.mixer: [mlp, attention]}
train:
  epochs: 1
  lr: 0.001
model: {patch_size: 4, heads: 2, depth: 2, dim: 32}
dataset: {image_size: 32, name: synthetic}
name: t
"""
    b = load_study(write(tmp_path / "b.yaml", reordered))
    assert {t.trial_id for t in a.trials} == {t.trial_id for t in b.trials}
    # an explicit default gives the same id as leaving it out
    c = load_study(write(tmp_path / "c.yaml", GOOD.replace("dim: 32", "dim: 32, mlp_ratio: 4")))
    assert {t.trial_id for t in a.trials} == {t.trial_id for t in c.trials}
    # a real change gives a new id
    d = load_study(write(tmp_path / "d.yaml", GOOD.replace("epochs: 1", "epochs: 2")))
    assert not {t.trial_id for t in a.trials} & {t.trial_id for t in d.trials}


def test_trial_id_is_stable_across_processes(tmp_path):
    path = write(tmp_path / "s.yaml", GOOD)
    here = [t.trial_id for t in load_study(path).trials]
    code = ("import json,sys; from ablate.study import load_study; "
            f"print(json.dumps([t.trial_id for t in load_study({str(path)!r}).trials]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, cwd=tmp_path).stdout
    assert json.loads(out) == here
    assert trial_id({"a": 1, "b": [1, 2]}) == trial_id({"b": [1, 2], "a": 1})


def test_plan_json_lists_trials_with_ids_and_config(tmp_path):
    path = write(tmp_path / "s.yaml", GOOD)
    res = runner.invoke(app, ["plan", str(path), "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert len(rows) == 4
    for r in rows:
        assert trial_id(r["config"]) == r["trial_id"]
        assert r["config"]["model"]["mixer"] == r["factors"]["model.mixer"]
    table = runner.invoke(app, ["plan", str(path)])
    assert table.exit_code == 0 and rows[0]["trial_id"] in table.stdout


@pytest.mark.parametrize("name", ["quickstart", "patches_vs_attention", "cifar10_cpu"])
def test_shipped_studies_validate(name, monkeypatch):
    monkeypatch.setenv("ABLATE_DATA", str(ROOT.parent / "shared" / "data"))
    res = runner.invoke(app, ["validate", str(ROOT / "studies" / f"{name}.yaml")])
    assert res.exit_code == 0, res.output


def test_patches_vs_attention_covers_the_issue_grid(monkeypatch):
    s = load_study(ROOT / "studies" / "patches_vs_attention.yaml")
    f = [t.factors for t in s.trials]
    assert {x["model.mixer"] for x in f} == {"attention", "mlp", "conv", "dual", "pool",
                                             "identity"}
    assert {x["model.patch_size"] for x in f} == {1, 2, 4, 8}
    assert {x["model.kernel_size"] for x in f if x["model.mixer"] == "conv"} == {3, 5, 7, 9}
    assert {x["model.tokens"] for x in f} == {None, 8, 16}
    assert {x["dataset.fraction"] for x in f} == {0.1, 0.25, 0.5, 1.0}
    assert {t.seed for t in s.trials} == {0, 1, 2}


def test_cli_subprocess_exit_code_and_help(tmp_path):
    path = write(tmp_path / "s.yaml", GOOD.replace("epochs: 1", "epochs: ten"))
    exe = Path(sys.executable).with_name("ablate")
    res = subprocess.run([str(exe), "validate", str(path)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert res.stderr.strip().startswith(f"{path}: train.epochs:")
    assert "Traceback" not in res.stderr
    for cmd in ([], ["validate"], ["plan"], ["run"], ["status"], ["models"], ["profile"],
                ["dashboard"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output
    v = runner.invoke(app, ["--version"])
    assert v.exit_code == 0 and "ablate 0.1.0" in v.output


def test_billion_laughs_is_refused_fast_naming_the_limit(tmp_path):
    import time

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("name: [*i, *i, *i, *i, *i, *i, *i, *i, *i]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1000
    t = time.perf_counter()
    with pytest.raises(StudyError, match=r"bomb.yaml: expands to [\d,]+ values through YAML"):
        load_study(path)
    assert time.perf_counter() - t < 5  # a guard against a hang, not a speed target


def test_deep_nesting_and_huge_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\ndescription: " + "[" * 50 + "]" * 50 + "\n")
    with pytest.raises(StudyError, match=r"deep.yaml: nested deeper than 20 levels"):
        load_study(deep)
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(StudyError, match=r"big.yaml: is 2,097,161 bytes, over the 1,048,576"):
        load_study(big)


def test_pos_embed_is_a_factor_and_enters_the_trial_id(tmp_path):
    s = load_study(write(tmp_path / "s.yaml", GOOD.replace("model.mixer: [attention, mlp]",
                                                          "model.pos_embed: [none, learned]")))
    assert {t.config["model"]["pos_embed"] for t in s.trials} == {"none", "learned"}
    assert len({t.cell_id for t in s.trials}) == 2
    d = load_study(write(tmp_path / "d.yaml", GOOD.replace("[attention, mlp]",
                                                          "[attention, dual, mlp]")))
    resolved = {t.factors["model.mixer"]: t.config["model"]["pos_embed"] for t in d.trials}
    assert resolved == {"attention": "learned", "dual": "cpe", "mlp": "none"}


def test_heads_default_to_64_dimensional_heads(tmp_path):
    """ViT's convention: dim 64 -> 1 head, dim 192 -> 3; no 'not divisible' error for dim 64."""
    text = GOOD.replace("heads: 2, ", "").replace("model.mixer: [attention, mlp]",
                                                   "model.dim: [64, 192]")
    s = load_study(write(tmp_path / "s.yaml", text))
    assert {t.factors["model.dim"]: t.config["model"]["heads"] for t in s.trials} == {64: 1,
                                                                                     192: 3}


def test_val_fraction_zero_runs_when_asked_for_and_nothing_needs_it(tmp_path):
    text = GOOD.replace("image_size: 32", "image_size: 32, val_fraction: 0, allow_no_val: true")
    s = load_study(write(tmp_path / "s.yaml", text))
    assert len(s.trials) == 4 and all(t.dataset.val_fraction == 0 for t in s.trials)


def test_level_equal_to_the_model_default_is_merged_with_a_warning(tmp_path, caplog):
    """heads null means dim // 64 = 3 at dim 192 (ViT-Ti): [null, 3] is one model, run once."""
    text = GOOD.replace("heads: 2, ", "").replace("dim: 32", "dim: 192").replace(
        "model.mixer: [attention, mlp]", "model.heads: [null, 3]")
    s = load_study(write(tmp_path / "s.yaml", text))
    assert len(s.trials) == 2 and {t.seed for t in s.trials} == {0, 1}
    assert [t.factors["model.heads"] for t in s.trials] == [3, 3]
    assert len(s.warnings) == 1
    assert s.warnings[0].startswith(f"{tmp_path / 's.yaml'}: factors {{model.heads=3}}: ")
    merged = "model.heads=3 is the same model as model.heads=null (both resolve to 3)"
    assert merged in s.warnings[0]
    assert s.warnings[0] in caplog.text


def test_two_cells_that_are_one_trial_under_different_labels_are_an_error():
    """The safety net behind the ignored-factor rule: whatever makes two differently labelled
    cells resolve to one trial, the study is rejected naming both."""
    from ablate.study import Cell, DatasetSpec, ModelSpec, TrainSpec, TrialSpec, merge_cell

    ds, ts = DatasetSpec(), TrainSpec()
    a = TrialSpec.build(ds, ModelSpec(arch="timm:resnet18", dim=64), ts, 0, 0, ["model.dim"])
    b = TrialSpec.build(ds, ModelSpec(arch="timm:resnet18", dim=128), ts, 0, 0, ["model.dim"])
    assert a.cell_id == b.cell_id and a.factors != b.factors
    cells: dict = {}
    problems: list = []
    warnings: list = []
    assert merge_cell(cells, Cell("factors {model.dim=64}", 0, {"model.dim": 64}, a),
                      problems, warnings)
    assert not merge_cell(cells, Cell("factors {model.dim=128}", 0, {"model.dim": 128}, b),
                          problems, warnings)
    assert problems == [("factors {model.dim=64} and factors {model.dim=128}",
                         "are the same trial although model.dim differ: the model ignores it; "
                         "remove it from one of the cells")]
    assert warnings == []


def test_only_auto_at_one_precision_for_the_study_is_a_new_trial(tmp_path):
    """`precision: auto` trained each architecture at its own pick before
    `train.precision_scope` existed; that is now `architecture`, whose trials keep the ids
    they had (the field is not in their config); the default, one precision for the study,
    trains otherwise, so its trials are other trials (an older study's runs are outdated,
    not resumed). With a fixed precision the scope changes nothing, ids included."""
    def trials(name: str, train: str) -> list:
        path = write(tmp_path / f"{name}.yaml", GOOD.replace("train: {epochs: 1}", train))
        return load_study(path).trials

    study = trials("a", "train: {epochs: 1, precision: auto}")
    named = trials("b", "train: {epochs: 1, precision: auto, precision_scope: study}")
    per_arch = trials("c", "train: {epochs: 1, precision: auto, precision_scope: architecture}")
    assert [t.trial_id for t in named] == [t.trial_id for t in study]
    assert not {t.trial_id for t in per_arch} & {t.trial_id for t in study}
    assert all("precision_scope" not in t.config["train"] for t in per_arch)
    assert all(t.config["train"]["precision_scope"] == "study" for t in study)
    fixed = [[t.trial_id for t in trials(f"f{i}", f"train: {{epochs: 1{extra}}}")]
             for i, extra in enumerate(["", ", precision_scope: study",
                                        ", precision_scope: architecture"])]
    assert fixed[0] == fixed[1] == fixed[2]
