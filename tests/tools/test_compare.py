"""``lightning-tvlars compare``: options, the shared protocol on any metric, one run through a
Trainer, the refusals before anything runs, and the command end to end with its resume."""

from __future__ import annotations

import csv
import functools
import math
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_tvlars import LAMB, TVLARSScheduler
from lightning_tvlars.bench import protocol, report
from lightning_tvlars.bench.protocol import ARMS, RunSpec, Study
from lightning_tvlars.compare import check, cli, options, run
from lightning_tvlars.compare import report as compare_report
from lightning_tvlars.compare.options import CompareError, Monitor

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
BORING = [
    "--model",
    "lightning.pytorch.demos.boring_classes.BoringModel",
    "--data",
    "lightning.pytorch.demos.boring_classes.BoringDataModule",
]
REGRESSION = ["--model", "compare_models.Regression", "--data", "compare_models.RegressionData"]


# ------------------------------------------------------------------------------ options


def test_monitor_modes_and_lr_grids() -> None:
    assert options.infer_mode("val/acc") == "max"
    assert options.infer_mode("val_loss") == "min"
    assert options.infer_mode("validation_step.x") is None
    assert options.infer_mode("val/loss_acc") is None  # says both: the user must
    assert options.parse_monitor("val/top1") == Monitor("val/top1", "max")
    assert options.parse_monitor("score:min") == Monitor("score", "min")
    assert options.parse_monitor("a:b") == Monitor("a:b", None)
    assert options.parse_lr_grid(["2", "0.123456", "lamb=0.01,0.001"]) == {
        "lars": (0.1235, 2.0),
        "lamb": (0.001, 0.01),
    }
    with pytest.raises(CompareError, match="FAMILY one of lamb, lars"):
        options.parse_lr_grid(["sgd=0.1"])
    with pytest.raises(CompareError, match="'-1' is not a learning rate"):
        options.parse_lr_grid(["lars=1,-1"])


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-tvlars compare: error: ") and "\n" not in err, err
    return err.split("error: ", 1)[1]


def test_bad_options_are_refused_in_one_line_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "out")]
    assert _error(capsys, *BORING, "--arms", "tvlars", "sgd", *out).startswith(
        "--arms sgd: unknown arm; expected some of tvlars, tvlars-cosine, lars,"
    )
    assert _error(capsys, *BORING, "--arms", "tvlars", "lightly-lars-warmup-cosine", *out) == (
        "--arms lightly-lars-warmup-cosine: unknown arm; expected some of tvlars, tvlars-cosine, "
        "lars, lars-warmup, lars-warmup-cosine, lars-warmup-phase, lamb-warmup-cosine, tvlamb"
    )
    assert _error(capsys, "--model", "nope.Model", *out) == (
        "--model=nope.Model is invalid: cannot import it (No module named 'nope')"
    )
    assert _error(capsys, "--model", "torch.nn.Linear", *out) == (
        "--model=torch.nn.Linear is invalid: expected the import path of a LightningModule subclass"
    )
    assert _error(capsys, *REGRESSION, "--data.batch_size", "x", *out) == (
        "--data.batch_size=x is invalid: expected an integer"
    )
    assert _error(capsys, *BORING, "--batch-sizes", "32", *out).startswith(
        "--batch-sizes 32: BoringDataModule takes no batch_size argument, so compare cannot "
        "set its batch size;"
    )
    assert _error(capsys, *REGRESSION, "--batch-sizes", "16", "0", *out) == (
        "--batch-sizes=0 is invalid: expected integers >= 1"
    )
    assert _error(capsys, *REGRESSION, "--seeds", "1", *out).startswith("--seeds=1 is invalid")
    assert _error(capsys, *REGRESSION, "--epochs", "1", "--steps", "2", *out).startswith(
        "--epochs=1 and --steps=2 are both given"
    )
    assert _error(
        capsys, *REGRESSION, "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=x"
    ).startswith("--trainer.callbacks=EarlyStopping is invalid: it would end the arms' runs")
    assert _error(capsys, *REGRESSION, "--trainer.max_time", "00:00:01:00", *out).startswith(
        "--trainer.max_time=00:00:01:00 is invalid here"
    )
    assert _error(capsys, *REGRESSION, "--arms", "lars-warmup-phase", "lars", *out) == (
        "--arms lars-warmup-phase takes the phase chosen for tvlars: add tvlars"
    )
    assert not (tmp_path / "out").exists()


def test_a_yaml_config_gives_every_option_and_the_trainer_keeps_its_settings(
    tmp_path: Path,
) -> None:
    config = tmp_path / "compare.yaml"
    config.write_text(
        """
model: {class_path: compare_models.Regression, init_args: {hidden: 4}}
data: {class_path: compare_models.RegressionData}
arms: [tvlars, lamb-warmup-cosine]
batch_sizes: [8, 32]
steps: 7
lr_grid: ["lars=0.5,1", "lamb=0.01"]
trainer:
  precision: bf16-mixed
  gradient_clip_val: 1.0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
"""
    )
    opts = options.parse(["--config", str(config), "--seeds", "3"])
    assert (opts.arms, opts.batch_sizes, opts.seeds) == (
        ("tvlars", "lamb-warmup-cosine"),
        (8, 32),
        3,
    )
    assert opts.target.budget == ("steps", 7)
    assert opts.lr_points == {"lars": (0.5, 1.0), "lamb": (0.01,)}
    assert [note.split(" is left out")[0] for note in opts.notes] == [
        "the trainer's ModelCheckpoint",
        "the trainer's LearningRateMonitor",  # it needs the logger the runs do not have
    ]
    module, data, kwargs = opts.target.build(32)
    assert module.net[0].out_features == 4 and data is not None and data.batch_size == 32
    assert (kwargs["precision"], kwargs["gradient_clip_val"], kwargs["max_steps"]) == (
        "bf16-mixed",
        1.0,
        7,
    )
    assert kwargs["callbacks"] == [] and kwargs["logger"] is False
    # the setup names the model, data, trainer and budget, not the cell's batch size
    again = options.parse(["--config", str(config), "--batch-sizes", "64"])
    other = options.parse(["--config", str(config), "--model.hidden", "5"])
    assert again.target.fingerprint == opts.target.fingerprint != other.target.fingerprint


def test_modules_that_cannot_be_compared_are_refused_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "out"), "--steps", "2"]
    two = ["--model", "compare_models.TwoOptimizers", "--data", "compare_models.RegressionData"]
    assert _error(capsys, *two, *out).startswith(
        "--model TwoOptimizers cannot be compared: it uses manual optimization with 2 optimizers"
    )
    assert _error(capsys, *BORING, *out) == (
        "--monitor: BoringModel logs no validation metric (self.log in validation_step) to "
        "select on; its validation_step returns validation_step.x: select on --monitor "
        "validation_step.x:min (or :max), or log one and name it with --monitor NAME[:max|min]"
    )
    assert _error(capsys, *BORING, "--monitor", "validation_step.x", *out) == (
        "--monitor validation_step.x: its name does not say whether larger is better: give "
        "--monitor validation_step.x:max or --monitor validation_step.x:min"
    )
    assert _error(capsys, *REGRESSION, "--monitor", "val/acc", *out) == (
        "--monitor=val/acc is invalid: Regression's validation gives val_loss"
    )
    mnist = [
        "--model",
        "lightning_tvlars.examples.classifier.MNIST1DClassifier",
        "--data",
        "lightning_tvlars.examples.mnist1d.MNIST1DDataModule",
    ]
    # a check of the class's own names the flag, as fit's does
    assert _error(capsys, *mnist, "--data.val_size", "999999", *out).startswith(
        "--data.val_size=999999 is invalid"
    )
    assert _error(capsys, *mnist, "--data.batch_size", "0", *out) == (
        "--data.batch_size=0 is invalid: expected an int > 0"
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the protocol


def _study(**changes: Any) -> Study:
    base = dict(
        tasks=("Regression",),
        batch_sizes={"Regression": (16,)},
        arms={"Regression": ("lars-warmup",)},
        metric="value",
        mode="min",
        axis_size=2,
        eval_seeds=2,
    )
    return Study(**{**base, **changes})  # type: ignore[arg-type]


def _rows(study: Study, rows: list[dict[str, str]], score: Any) -> list[RunSpec]:
    todo = protocol.plan(study, rows)
    rows += [
        {
            "task": s.task,
            "arm": s.arm,
            "batch_size": str(s.batch_size),
            "seed": str(s.seed),
            "role": s.role,
            "lr": f"{s.lr:.4g}",
            "setting": s.setting,
            "value": str(score(s)),
        }
        for s in todo
    ]
    return todo


def test_a_minimized_metric_selects_the_lowest_and_extends_within_the_seeds_spread() -> None:
    study = _study()
    arm = ARMS["lars-warmup"]
    # the default grid of a task the benchmark never tuned: around LARS's 1.0
    assert [study.lr(arm, "Regression", k) for k in study.lr_indices(arm)] == [
        0.3162,
        0.5623,
        1.0,
        1.778,
        3.162,
    ]
    rows: list[dict[str, str]] = []
    # loss lowest at 1.0; the top edge 3.162 is 0.05 above it, the seeds differ by +-0.1
    noisy = {0: -0.1, 1: 0.1}
    _rows(study, rows, lambda s: abs(math.log10(s.lr)) * 0.1 + noisy[s.seed])
    state = protocol.cell_state(study, "Regression", 16, arm, rows)
    assert state.lr is None and state.grid == (-2, -1, 0, 1, 2, 3)  # the edge is within noise
    assert state.scores[(1.0, "warmup=0.2")] == pytest.approx(0.0)
    # without spread between the seeds the same edge is clearly worse: no extension
    rows = []
    _rows(study, rows, lambda s: abs(math.log10(s.lr)) * 0.1)
    state = protocol.cell_state(study, "Regression", 16, arm, rows)
    assert (state.lr, state.grid) == (1.0, (-2, -1, 0, 1, 2))
    # a diverged run (nan) is the worst for a minimized metric too
    assert study.score({"value": "nan"}) == math.inf
    assert not study.within_noise(0.1, math.inf, (0.0, math.nan))
    expected, at_most = protocol.run_count(study, rows)
    assert (expected, at_most) == ((5 + 1) * 2 + 2, (5 + 1) * 2 + 2)  # past the LR stage


def test_an_explicit_grid_is_not_extended_and_an_edge_choice_is_flagged() -> None:
    study = _study(lr_points={"lars": (0.5, 2.0)})
    arm = ARMS["lars-warmup"]
    assert protocol.run_count(study, []) == ((2 + 1) * 2 + 2, (2 + 1) * 2 + 2)
    rows: list[dict[str, str]] = []
    while _rows(study, rows, lambda s: 1.0 / s.lr):  # the largest rate is best
        pass
    state = protocol.cell_state(study, "Regression", 16, arm, rows)
    assert (state.lr, state.grid) == (2.0, (0, 1))
    cells = report.cells(study, rows)
    assert [c.arm for c in cells if report.at_edge(study, c)] == ["lars-warmup"]
    with pytest.raises(ValueError, match="expected increasing rates"):
        _study(lr_points={"lars": (2.0, 0.5)})


def test_comparisons_among_any_arms_and_a_lower_is_better_verdict() -> None:
    pairs = protocol.comparisons_for(("tvlars", "lars-warmup-cosine", "lamb-warmup-cosine"))
    labels = {(c.a, c.b): c.isolates for c in pairs}
    assert labels[("tvlars", "lars-warmup-cosine")].startswith("TVLARS as published vs")
    assert labels[("lars-warmup-cosine", "lamb-warmup-cosine")] == "optimizer (lars vs lamb)"
    assert len(pairs) == 3
    study = _study(arms={"Regression": ("tvlars", "lars-warmup-cosine")})
    state = protocol.CellState(1.0, "x", (0,), {}, (), ())

    def cell(arm: str, values: list[float]) -> report.Cell:
        rows = [{"value": str(v), "seed": str(i), "converged": "1"} for i, v in enumerate(values)]
        return report.Cell("Regression", 16, arm, state, tuple(rows))

    cells = [
        cell("tvlars", [0.10, 0.11, 0.105, 0.108]),
        cell("lars-warmup-cosine", [0.20, 0.21, 0.205, 0.208]),
    ]
    (lower,) = report.comparisons(study, cells, column="value", higher_is_better=False, pairs=pairs)
    assert (lower.a, lower.verdict) == ("tvlars", "win")  # a lower loss wins
    assert lower.diff == pytest.approx(-0.1)
    (higher,) = report.comparisons(study, cells, column="value", pairs=pairs)
    assert higher.verdict == "loss"
    cells[0] = cell("tvlars", [0.10, math.nan, 0.105, 0.108])
    assert report.comparisons(study, cells, column="value", pairs=pairs) == []  # diverged
    assert compare_report.untested(cells, [], pairs) == [
        "- batch 16, tvlars − lars-warmup-cosine: not tested (1 diverged run(s) without a "
        "finite final value)"
    ]


# ------------------------------------------------------------------------------ one run


def _options(tmp_path: Path, *argv: str) -> options.Options:
    return options.parse(
        [*REGRESSION, "--steps", "3", "--out", str(tmp_path), "--tune-seeds", "1", *argv]
    )


def test_the_arm_recipe_replaces_configure_optimizers(tmp_path: Path) -> None:
    target = _options(tmp_path).target
    module, data, kwargs = target.build(8)
    assert data is not None and data.batch_size == 8
    spec = RunSpec("Regression", "lamb-warmup-cosine", 8, 0, "tune", "lr", 0.01, "warmup=0.4", 0.4)
    plan = run.replace_optimizers(module, spec)
    trainer = pl.Trainer(**{**kwargs, "max_steps": 5})
    trainer.fit(module, datamodule=data)
    (optimizer,) = trainer.optimizers
    (scheduler,) = [c.scheduler for c in trainer.lr_scheduler_configs]
    assert isinstance(optimizer, LAMB) and isinstance(scheduler, TVLARSScheduler)
    assert scheduler.plan.warmup_steps == 2  # 0.4 of the 5 steps
    assert (plan.total_steps, plan.batch_size, plan.early_step) == (5, 8, 2)
    assert trainer.global_step == 5
    assert type(module).configure_optimizers is not module.configure_optimizers  # instance only
    fresh, _, _ = target.build(8)
    assert isinstance(fresh.configure_optimizers(), torch.optim.SGD)  # the class is untouched


def test_a_run_reads_the_final_metric_and_shares_initial_weights_across_arms(
    tmp_path: Path,
) -> None:
    target = _options(tmp_path).target
    monitor = Monitor("val_loss", "min")
    train = functools.partial(run.train, target=target, monitor=monitor, sharpness=False)
    pickle.loads(pickle.dumps(train))  # what worker processes (--jobs) receive
    rows = [
        train(RunSpec("Regression", arm, 16, 3, "eval", "eval", 1.0, setting, 0.2))
        for arm, setting in (("tvlars", "half=0.3"), ("lars-warmup-cosine", "warmup=0.2"))
    ]
    assert set(rows[0]) == set(run.FIELDS)
    assert rows[0]["initial_value"] == rows[1]["initial_value"]  # same seed, same weights
    assert rows[0]["value"] != rows[1]["value"]  # different recipes
    for row in rows:
        assert (row["steps"], row["diverged"], row["devices"]) == (3, 0, 1)
        assert float(row["value"]) < float(row["initial_value"])
        assert row["converged"] == 1
        assert row["setup"] == target.fingerprint and row["code_version"]


def test_a_diverging_run_is_flagged_and_stops_at_the_end_of_its_epoch(tmp_path: Path) -> None:
    target = options.parse(
        [
            "--model",
            "compare_models.Diverging",
            "--data",
            "compare_models.RegressionData",
            "--epochs",
            "3",
            "--out",
            str(tmp_path),
        ]
    ).target
    row = run.train(
        RunSpec("Diverging", "tvlars", 16, 0, "tune", "lr", 1.0, "half=0.3", 0.2),
        target=target,
        monitor=Monitor("val_loss", "min"),
        sharpness=False,
    )
    assert (row["diverged"], row["converged"], row["epochs"]) == (1, 0, 1)  # 1 of 3 epochs
    assert row["train_loss"] == "nan" and row["steps"] == 4  # 64 samples / 16


def test_manual_optimization_with_one_optimizer_is_compared(tmp_path: Path) -> None:
    model = ["--model", "compare_models.OneManualOptimizer"]
    opts = options.parse([*model, *REGRESSION[2:], "--steps", "2", "--out", str(tmp_path)])
    checked = check.check(opts)
    assert (checked.monitor, checked.world_size, checked.mixin) == (
        Monitor("val_loss", "min"),
        1,
        False,
    )
    row = run.train(
        RunSpec("OneManualOptimizer", "tvlars", 16, 0, "tune", "lr", 1.0, "half=0.3", 0.2),
        target=opts.target,
        monitor=checked.monitor,
        sharpness=False,
    )
    assert row["steps"] == 2 and float(row["value"]) < float(row["initial_value"])


# ------------------------------------------------------------------------------ end to end


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_documented_boring_command_reports_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's command (the BoringModel's returned value as the monitor, the loaders'
    own batch size) with a budget of seconds, in a subprocess; then an interrupted copy of
    its CSV resumes without repeating a run, and another setup is refused."""
    out = tmp_path / "out"
    argv = [
        *BORING,
        "--arms",
        "tvlars",
        "lars-warmup-cosine",
        "--seeds",
        "2",
        "--max-minutes",
        "4",
        "--monitor",
        "validation_step.x:min",
        # the smaller budget of CI
        "--tune-seeds",
        "1",
        "--lr-grid",
        "0.5",
        "2",
        "--steps",
        "3",
        "--trainer.limit_val_batches",
        "4",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_tvlars.cli", "compare", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "configure_optimizers is replaced in every run by the arm's recipe" in done.stdout
    assert re.search(r"12 runs \(at most 12 .*, 0 done in", done.stdout)
    assert "12/12 runs" in done.stdout
    rows = _csv(out / "compare.csv")
    assert len(rows) == 12 and tuple(rows[0]) == run.FIELDS
    assert {r["batch_size"] for r in rows} == {"1"}  # BoringDataModule's loaders' own
    assert all(r["code_version"] and r["monitor"] == "validation_step.x:min" for r in rows)
    page = (out / "compare.md").read_text()
    assert "## Answer" in page and "tvlars − lars-warmup-cosine" in page
    assert "2 of 2 cells complete" in page and "Partial results" not in page
    assert (out / "compare.png").exists() and (out / "compare_tuning.png").exists()

    # interrupted after 5 rows: the same command runs the other 7, none twice
    lines = (out / "compare.csv").read_text().splitlines(keepends=True)
    (out / "compare.csv").write_text("".join(lines[:6]))
    cli.main(argv)
    said = capsys.readouterr().out
    assert "12 runs (at most 12 if the learning-rate grids grow), 5 done in" in said
    resumed = _csv(out / "compare.csv")
    assert resumed[:5] == rows[:5]
    keys = [protocol.row_key(r) for r in resumed]
    assert len(keys) == len(set(keys)) == 12
    assert sorted(keys) == sorted(protocol.row_key(r) for r in rows)
    # another budget is another setup: refused, nothing appended
    assert _error(capsys, *argv, "--steps", "4").startswith(
        f"--out {out}: its compare.csv holds runs of another setup"
    )
    assert len(_csv(out / "compare.csv")) == 12


def test_a_time_budget_cut_leaves_a_partial_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main([*REGRESSION, "--steps", "2", "--max-minutes", "0", "--out", str(tmp_path)])
    assert "time budget of 0 min spent" in capsys.readouterr().out
    page = (tmp_path / "compare.md").read_text()
    assert "**Partial results**" in page and "0 of 2 cells complete" in page


def test_documented_compare_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    commands = []
    for page in (ROOT / "README.md", ROOT / "docs" / "compare.md"):
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line)
                if words[:2] == ["lightning-tvlars", "compare"]:
                    commands.append(words[2:])
    assert len(commands) >= 3
    for words in commands:
        if "--batch-sizes" in words and "BoringDataModule" in " ".join(words):
            with pytest.raises(CompareError, match="takes no batch_size argument"):
                options.parse(words)
        else:
            options.parse(words)
