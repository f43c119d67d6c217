"""The accuracy benchmark: statistics, protocol, training loop and pipeline end to end.

(The step benchmark's counters are tested in ``test_bench_step.py``.)"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tvlars.bench import accuracy, protocol, report, runner, stats, train
from lightning_tvlars.bench.protocol import ARMS, PRESETS, Preset, Probe, RunSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Small ops on a busy machine: one thread avoids OpenMP spin contention (10-30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ statistics
# Reference values computed once with SciPy 1.17.1 (scipy.stats.ttest_ind(a, b,
# equal_var=False) and its confidence_interval(0.95), scipy.stats.t.ppf / t.sf,
# scipy.special.betainc, scipy.stats.spearmanr).

A = [0.8812, 0.8790, 0.8861, 0.8755, 0.8830, 0.8802, 0.8779, 0.8845]
B = [0.8741, 0.8799, 0.8702, 0.8768, 0.8720, 0.8733, 0.8790, 0.8711, 0.8751]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (
            A,
            B,
            (
                3.747419093215052,
                0.002018071219459996,
                14.632502872247551,
                0.002714816216671026,
                0.009912961561106878,
            ),
        ),
        (
            [0.95, 0.40, 0.91, 0.88, 0.93],
            [0.90, 0.89, 0.91],
            (
                -0.8245126242013331,
                0.4557111617301109,
                4.024548392005706,
                -0.37489913304927464,
                0.2028991330492747,
            ),
        ),
    ],
)
def test_welch_matches_scipy(a: list[float], b: list[float], expected: tuple[float, ...]) -> None:
    t, p, df, low, high = expected
    result = stats.welch(a, b)
    assert result.t == pytest.approx(t, rel=1e-12)
    assert result.p == pytest.approx(p, rel=1e-9)
    assert result.df == pytest.approx(df, rel=1e-12)
    assert (result.low, result.high) == pytest.approx((low, high), rel=1e-9)
    assert result.diff == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert (result.n_a, result.n_b) == (len(a), len(b))


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [
        (0.975, 1, 12.706204736174694),
        (0.995, 2, 9.924843200918287),
        (0.975, 3.5, 2.9400886379827282),
        (0.975, 7.3, 2.345066736547703),
        (0.6, 30, 0.2556053649519128),
        (0.975, 1000, 1.9623390808264083),
    ],
)
def test_t_quantile_matches_scipy(q: float, df: float, expected: float) -> None:
    assert stats.t_quantile(q, df) == pytest.approx(expected, rel=1e-10)
    assert stats.t_quantile(1 - q, df) == pytest.approx(-expected, rel=1e-10)


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 0.141463028121509), (3.5, 0.05676291261039907), (30, 0.022121235631161765)],
)
def test_t_sf_matches_scipy(df: float, expected: float) -> None:
    assert stats.t_sf(2.1, df) == pytest.approx(expected, rel=1e-10)
    assert stats.t_sf(-2.1, df) == pytest.approx(1 - expected, rel=1e-10)
    assert stats.t_sf(0.0, df) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("a", "b", "x", "expected"),
    [
        (0.5, 0.5, 0.3, 0.36901011956554536),
        (3.65, 0.5, 0.2, 0.0008740968994658442),
        (20, 0.5, 0.99, 0.5286300645149844),
        (2, 3, 0.7, 0.9163),
    ],
)
def test_betainc_matches_scipy(a: float, b: float, x: float, expected: float) -> None:
    assert stats.betainc(a, b, x) == pytest.approx(expected, rel=1e-12)


def test_welch_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least two values"):
        stats.welch([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        stats.welch([1.0, 2.0], [1.0, 2.0], confidence=1.0)
    same = stats.welch([0.1, 0.1], [0.1, 0.1])  # e.g. two arms that always diverge
    assert (same.p, same.diff, same.low, same.high) == (1.0, 0.0, 0.0, 0.0)
    apart = stats.welch([0.2, 0.2], [0.1, 0.1])
    assert apart.p == 0.0 and apart.t == math.inf
    # a larger confidence gives a wider interval around the same difference
    wide = stats.welch(A, B, confidence=0.99)
    narrow = stats.welch(A, B)
    assert wide.low < narrow.low < narrow.diff < narrow.high < wide.high


def test_holm_textbook_example() -> None:
    # m = 4: sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, then max(0.06, 0.04 x 1)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([]) == []
    assert stats.holm([0.3]) == [0.3]
    assert stats.holm([0.5, 0.6, 0.9]) == [1.0, 1.0, 1.0]  # capped at 1
    with pytest.raises(ValueError, match="p-value"):
        stats.holm([0.1, 1.5])


def test_holm_is_never_below_the_raw_p_and_keeps_the_order() -> None:
    rng = np.random.default_rng(0)
    raw = list(rng.uniform(0, 0.2, size=12))
    adjusted = stats.holm(raw)
    assert all(a >= r for a, r in zip(adjusted, raw, strict=True))
    ranked = sorted(range(12), key=lambda i: raw[i])
    assert [adjusted[i] for i in ranked] == sorted(adjusted)


def test_spearman_matches_scipy_with_ties() -> None:
    x = [0.1, 0.5, 0.3, 0.3, 0.9, 0.7, 0.2, 0.8]
    y = [1, 3, 2, 5, 4, 8, 2, 7]
    rho, p, n = stats.spearman(x, y)
    assert (rho, p, n) == (pytest.approx(0.7409638554216866), pytest.approx(0.03544853929737528), 8)
    # non-finite pairs are dropped; too few pairs or a constant side give nan
    assert stats.spearman([*x, math.nan], [*y, 1.0])[2] == 8
    assert math.isnan(stats.spearman([1.0, 2.0], [1.0, 2.0])[0])
    assert math.isnan(stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])
    assert stats.spearman([1, 2, 3, 4], [8, 6, 4, 2])[:2] == (-1.0, 0.0)


# ------------------------------------------------------------------------------ protocol


def _tiny(**changes: Any) -> Preset:
    base = Preset(
        name="tiny",
        stem="tiny",
        tasks=("classification",),
        batch_sizes=(64,),
        arms={"classification": ("tvlars", "lars-warmup")},
        epochs={"classification": 1},
        num_samples=1_000,
        val_size=100,
        eval_seeds=3,
    )
    return replace(base, **changes)


def _row(spec: RunSpec, val: float) -> dict[str, str]:
    return {
        "task": spec.task,
        "arm": spec.arm,
        "batch_size": str(spec.batch_size),
        "seed": str(spec.seed),
        "role": spec.role,
        "lr": f"{spec.lr:.4g}",
        "setting": spec.setting,
        "val_accuracy": str(val),
    }


def _finish(preset: Preset, rows: list[dict[str, str]], score: Any) -> list[RunSpec]:
    """Give every run the plan offers now the validation accuracy ``score(spec)``."""
    todo = protocol.plan(preset, rows)
    rows += [_row(spec, score(spec)) for spec in todo]
    return todo


def test_plan_tunes_lr_then_setting_then_evaluates_fresh_seeds() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    arm = ARMS["lars-warmup"]
    rows: list[dict[str, str]] = []
    first = _finish(preset, rows, lambda s: 0.5 - abs(s.lr - 1.0))  # best: the centre, 1.0
    assert [s.lr for s in first] == [0.3162, 0.5623, 1.0, 1.778, 3.162]
    assert {(s.role, s.stage, s.seed, s.setting) for s in first} == {
        ("tune", "lr", 0, "warmup=0.2")
    }
    assert [s.probe_fraction for s in first] == [0.2] * 5
    second = _finish(preset, rows, lambda s: {"warmup=0.05": 0.7}.get(s.setting, 0.1))
    assert [(s.stage, s.lr, s.setting) for s in second] == [
        ("axis", 1.0, setting) for setting in ("warmup=0.05", "warmup=0.1", "warmup=0.4")
    ]
    assert [s.probe_fraction for s in second] == [0.05, 0.1, 0.4]
    third = protocol.plan(preset, rows)
    assert [(s.role, s.seed, s.lr, s.setting) for s in third] == [
        ("eval", seed, 1.0, "warmup=0.05") for seed in (1, 2, 3)
    ]
    state = protocol.cell_state(preset, "classification", 64, arm, rows)
    assert (state.lr, state.setting, state.todo) == (1.0, "warmup=0.05", ())
    rows += [_row(s, 0.0) for s in third]
    assert protocol.plan(preset, rows) == []  # complete; a resume runs nothing


def test_plan_extends_the_grid_past_an_edge_at_most_twice() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    rows: list[dict[str, str]] = []
    increasing = lambda s: s.lr  # noqa: E731 - the best is always the largest rate
    _finish(preset, rows, increasing)
    assert [s.lr for s in _finish(preset, rows, increasing)] == [5.623]
    assert [s.lr for s in _finish(preset, rows, increasing)] == [10.0]
    after = _finish(preset, rows, increasing)  # still the edge, but no third extension
    assert {(s.stage, s.lr) for s in after} == {("axis", 10.0)}
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup"], rows)
    assert state.grid == (-2, -1, 0, 1, 2, 3, 4)
    # downwards; once the extension is worse, the old edge is interior and chosen
    rows = []
    near = lambda s: -abs(s.lr - 0.3)  # noqa: E731
    _finish(preset, rows, near)
    assert [s.lr for s in _finish(preset, rows, near)] == [0.1778]
    assert {(s.stage, s.lr) for s in _finish(preset, rows, near)} == {("axis", 0.3162)}


def test_plan_ties_go_to_the_smaller_rate_and_the_default_setting() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    rows: list[dict[str, str]] = []
    _finish(preset, rows, lambda s: 0.5 if s.lr in (0.5623, 1.778) else 0.1)
    _finish(preset, rows, lambda s: 0.5)
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup"], rows)
    assert (state.lr, state.setting) == (0.5623, "warmup=0.2")


def test_tvlars_evaluation_waits_for_the_paired_warmup_and_probes_at_its_end() -> None:
    preset = _tiny()
    rows: list[dict[str, str]] = []

    def score(s: RunSpec) -> float:
        return {"warmup=0.1": 0.9, "half=0.1": 0.9}.get(s.setting, 0.5 - abs(s.lr - 1.0))

    tvlars_first = [s for s in _finish(preset, rows, score) if s.arm == "tvlars"]
    assert {s.probe_fraction for s in tvlars_first} == {0.2}  # the LR search's warm-up
    assert {s.setting for s in tvlars_first} == {"half=0.3"}
    # finish TVLARS's tuning only: its evaluation waits for lars-warmup's choice
    rows += [_row(s, score(s)) for s in protocol.plan(preset, rows) if s.arm == "tvlars"]
    assert not [s for s in protocol.plan(preset, rows) if s.arm == "tvlars"]
    _finish(preset, rows, score)
    evaluation = [s for s in protocol.plan(preset, rows) if s.arm == "tvlars"]
    assert [(s.seed, s.setting, s.probe_fraction) for s in evaluation] == [
        (seed, "half=0.1", 0.1) for seed in (1, 2, 3)
    ]


def test_plan_puts_the_largest_batch_first_across_tasks() -> None:
    both = ("classification", "barlow_twins")
    preset = _tiny(tasks=both, batch_sizes=(32, 64), arms=dict.fromkeys(both, ("lars-warmup",)))
    order = [(s.batch_size, s.task) for s in protocol.plan(preset, [])]
    assert order[::5] == [(64, both[0]), (64, both[1]), (32, both[0]), (32, both[1])]


def test_preset_grids_and_validation() -> None:
    cpu = PRESETS["cpu"]
    assert cpu.seeds == tuple(range(1, 9)) and cpu.tune_seed not in cpu.seeds
    assert [cpu.lr(ARMS["lamb-warmup-cosine"], "classification", k) for k in (-2, 0, 2)] == [
        0.003162,
        0.01,
        0.03162,
    ]
    # every arm's second axis has the same size: equal tuning budgets
    assert {len(cpu.axis(ARMS[a])) for a in ARMS} == {4}
    assert cpu.axis(ARMS["tvlars"])[0] == "half=0.3"
    with pytest.raises(ValueError, match="arm 'sgd' is invalid"):
        _tiny(arms={"classification": ("sgd",)})
    with pytest.raises(ValueError, match="task 'gan' is invalid"):
        _tiny(tasks=("gan",))
    gpu = PRESETS["gpu"]
    assert max(gpu.batch_sizes) * 7 <= 0.8 * gpu.num_samples - gpu.val_size
    assert max(cpu.batch_sizes) * 7 <= 0.8 * cpu.num_samples - cpu.val_size + 300


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Preset:
    return _tiny(num_samples=600, val_size=60, width=4, projection_dim=16, probe=Probe(64, 3, 2, 2))


def test_mnist1d_noise_options_are_cached_under_their_own_name() -> None:
    from lightning_tvlars.examples import mnist1d

    plain = mnist1d.generate(400, seed=1)
    noisy = mnist1d.generate(400, seed=1, corr_noise_scale=0.25, iid_noise_scale=0.2)
    assert mnist1d.cache_path(400, 1).name == "mnist1d-400-seed1.npz"  # the default's name
    path = mnist1d.cache_path(400, 1, 0.25, 0.2)
    assert path.name == "mnist1d-400-seed1-corr0.25-iid0.2.npz" and path.exists()
    assert mnist1d.cache_path(400, 1, iid_noise_scale=0.2).name.endswith("-corrdefault-iid0.2.npz")
    # same templates and draws: only the noise differs, and more of it moves the samples
    assert np.array_equal(plain["y"], noisy["y"])
    assert not np.allclose(plain["x"], noisy["x"])
    with pytest.raises(ValueError, match="iid_noise_scale=-1"):
        mnist1d.generate(400, seed=1, iid_noise_scale=-1)
    data = mnist1d.MNIST1DDataModule(num_samples=400, val_size=40, seed=1, iid_noise_scale=0.2)
    data.setup()
    assert torch.equal(data.splits["test"].tensors[0][:, 0], torch.from_numpy(noisy["x_test"]))


class _Lightning(pl.LightningModule):
    """The benchmark's classifier in a LightningModule, configured as a Lightning user would."""

    def __init__(self, preset: Preset, spec: RunSpec, total: int) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        self.net = train.classifier(preset.width, preset.blocks)
        self.spec, self.total = spec, total

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        from lightning_tvlars import configure_tvlars

        arm = ARMS[self.spec.arm]
        return configure_tvlars(self, train.arm_config(arm, self.spec, self.total))


@pytest.mark.parametrize(
    ("arm", "setting", "lr"),
    [
        ("tvlars", "half=0.3", 1.0),
        ("tvlars-cosine", "authors", 1.778),
        ("lars-warmup-cosine", "warmup=0.2", 1.0),
        ("lamb-warmup-cosine", "warmup=0.1", 0.01),
    ],
)
def test_training_loop_matches_a_lightning_run(
    tiny_data: Preset, arm: str, setting: str, lr: float
) -> None:
    """Same initial weights and batches: the plain loop and Lightning's glue give the same
    weights, so the benchmark measures what ``configure_tvlars`` users get."""
    preset, batch_size, seed = tiny_data, 32, 3
    spec = RunSpec("classification", arm, batch_size, seed, "tune", "lr", lr, setting, 0.2)
    final: list[torch.Tensor] = []

    def keep(step: int, optimizer: torch.optim.Optimizer) -> None:
        final[:] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    row = train.run(spec, preset, "cpu", on_step=keep)
    data = train.device_data(preset, "cpu")
    steps = len(data.y_train) // batch_size
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    order = order[: steps * batch_size]
    loader = DataLoader(TensorDataset(data.x_train[order], data.y_train[order]), batch_size)
    module = _Lightning(preset, spec, steps)
    pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader)
    groups = module.trainer.optimizers[0].param_groups
    theirs = [p.detach() for g in groups for p in g["params"]]
    assert int(row["steps"]) == steps == module.trainer.global_step
    assert len(final) == len(theirs)
    for mine, other in zip(final, theirs, strict=True):
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6)


def test_phase_settings_give_the_documented_curves() -> None:
    total = 1000

    def phase(setting: str) -> Any:
        spec = RunSpec("classification", "tvlars", 64, 0, "tune", "lr", 1.0, setting, 0.2)
        model = train.classifier(4, 1)
        _, scheduler = train.optimizer_for(model, spec, steps_per_epoch=100, epochs=10)
        assert scheduler.plan.total_steps == total
        return scheduler.plan.phase

    assert phase("half=0.1")(100) == pytest.approx(0.5)
    assert phase("half=0.1")(total) == pytest.approx(0.01)
    late = phase("half=1")
    assert late(0) == pytest.approx(0.98, abs=0.005)
    assert late(total // 2) == pytest.approx(0.88, abs=0.005)
    assert late(total) == pytest.approx(0.49, abs=0.005)
    authors = phase("authors")
    assert (authors.alpha, authors.delay) == (0.1, -1.0)
    assert authors(0) == pytest.approx(1 / 1.1, abs=0.01)
    assert authors(total) == pytest.approx(train.AUTHORS_FINAL_PHASE)
    with pytest.raises(ValueError, match="invalid for a phase arm"):
        phase("warmup=0.1")


def test_barlow_twins_parts_equal_lightly_and_the_example() -> None:
    lightly_loss = pytest.importorskip("lightly.loss")
    from lightly.models.modules import BarlowTwinsProjectionHead

    from lightning_tvlars.examples import barlow_twins

    z_a, z_b = torch.randn(64, 16), torch.randn(64, 16)
    expected = lightly_loss.BarlowTwinsLoss(lambda_param=5e-3)(z_a.clone(), z_b.clone())
    torch.testing.assert_close(train.barlow_twins_loss(z_a, z_b), expected)
    torch.manual_seed(1)
    theirs = BarlowTwinsProjectionHead(8, 32, 16)
    torch.manual_seed(1)
    mine = train.projection_head(8, 32, 16)
    x = torch.randn(20, 8)
    torch.testing.assert_close(mine(x), theirs(x))
    x = torch.randn(10, 1, 40)
    torch.testing.assert_close(
        train.augment(x, torch.Generator().manual_seed(5)),
        barlow_twins.augment(x, torch.Generator().manual_seed(5)),
    )


def test_linear_probe_separates_separable_features() -> None:
    torch.manual_seed(0)
    centres = torch.randn(10, 6) * 4
    y = torch.randint(0, 10, (500,))
    x = centres[y] + 0.1 * torch.randn(500, 6)
    y_test = torch.randint(0, 10, (200,))
    x_test = centres[y_test] + 0.1 * torch.randn(200, 6)
    train_acc, test_acc = train.linear_probe((x, y), (x_test, y_test))
    assert train_acc == 1.0 and test_acc == 1.0
    # random labels cannot be predicted from the features
    assert train.linear_probe((x, y), (x_test, torch.randint(0, 10, (200,))))[1] < 0.3


def test_a_diverging_run_is_flagged_and_stops(tiny_data: Preset) -> None:
    spec = RunSpec("classification", "lars-warmup", 32, 0, "tune", "lr", 1e30, "warmup=0.05", 0.05)
    row = train.run(spec, replace(tiny_data, epochs={"classification": 3}), "cpu")
    assert row["diverged"] == 1 and row["converged"] == 0
    assert int(row["steps"]) < 3 * (540 // 32)  # stopped after the first epoch
    assert row["end_top_eigenvalue"] == ""


# ------------------------------------------------------------------------------ report


def _eval_rows(arm: str, accuracies: list[float], batch: int = 64) -> list[dict[str, str]]:
    return [
        {
            "task": "classification",
            "arm": arm,
            "batch_size": str(batch),
            "seed": str(seed),
            "role": "eval",
            "lr": "1",
            "setting": ARMS[arm].default,
            "test_accuracy": str(acc),
            "converged": "1",
        }
        for seed, acc in enumerate(accuracies, 1)
    ]


def test_comparisons_call_a_win_only_when_holm_adjusted_p_is_small() -> None:
    preset = _tiny(arms={"classification": ("tvlars", "lars-warmup", "lars-warmup-cosine")})
    state = protocol.CellState(1.0, "x", (0,), ())
    strong = [0.90, 0.91, 0.905, 0.907, 0.903, 0.909]
    cells = [
        report.Cell(
            "classification",
            64,
            "tvlars",
            replace(state, setting="half=0.3"),
            tuple(_eval_rows("tvlars", strong)),
        ),
        report.Cell(
            "classification",
            64,
            "lars-warmup",
            replace(state, setting="warmup=0.2"),
            tuple(_eval_rows("lars-warmup", [s - 0.05 for s in strong])),
        ),
        report.Cell(
            "classification",
            64,
            "lars-warmup-cosine",
            replace(state, setting="warmup=0.2"),
            tuple(_eval_rows("lars-warmup-cosine", [0.89, 0.92, 0.90, 0.91, 0.90, 0.91])),
        ),
    ]
    results = {(r.a, r.b): r for r in report.comparisons(preset, cells)}
    assert set(results) == {
        ("tvlars", "lars-warmup"),
        ("tvlars", "lars-warmup-cosine"),
        ("lars-warmup-cosine", "lars-warmup"),
    }
    raw = [r.p for r in results.values()]
    assert [r.p_holm for r in results.values()] == pytest.approx(stats.holm(raw))
    assert results[("tvlars", "lars-warmup")].verdict == "win"
    assert results[("tvlars", "lars-warmup")].diff == pytest.approx(0.05)
    assert results[("lars-warmup-cosine", "lars-warmup")].verdict == "win"
    assert results[("tvlars", "lars-warmup-cosine")].verdict == "tie"


def test_correlations_within_a_cell_and_across_cells() -> None:
    preset = _tiny(arms={"classification": ("tvlars", "lars-warmup")})
    rows = []
    for arm, offset in (("tvlars", 0.0), ("lars-warmup", 0.5)):
        for i, r in enumerate(_eval_rows(arm, [0.80, 0.85, 0.90, 0.95])):
            sharp = str(1.0 - (0.80 + 0.05 * i) + offset)  # sharper, worse; lars sharper
            rows.append(
                {
                    **r,
                    "end_filter_normalized": sharp,
                    "end_top_eigenvalue": "nan",
                    "early_filter_normalized": sharp,
                }
            )
    state = protocol.CellState(1.0, "x", (0,), ())
    cells = [
        report.Cell(
            "classification",
            64,
            arm,
            replace(state, setting=ARMS[arm].default),
            tuple(r for r in rows if r["arm"] == arm),
        )
        for arm in ("tvlars", "lars-warmup")
    ]
    result = dict(report.correlations(preset, rows, cells, "classification"))
    rho, p, n = result["within tvlars, batch 64"][0]
    assert (rho, n) == (-1.0, 4) and p == 0.0
    assert math.isnan(result["within tvlars, batch 64"][1][0])  # no finite eigenvalues
    across = result["across optimizers and batch sizes (one point per cell)"]
    assert across[0][2] == 2 and math.isnan(across[0][0])  # two cells: too few for a rank test
    table = "\n".join(report.correlation_table(list(result.items())))
    assert "| within tvlars, batch 64 | 4 | -1.00 | <1e-4 | n/a | n/a |" in table


# ------------------------------------------------------------------------------ end to end


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_benchmark_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    accuracy.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    rows = _csv(tmp_path / "accuracy.csv")
    assert tuple(rows[0]) == runner.FIELDS
    preset = PRESETS["cpu"].quick()
    assert protocol.plan(preset, rows) == []  # the protocol is complete
    assert {r["arm"] for r in rows} == set(preset.arms["classification"])
    evaluation = [r for r in rows if r["role"] == "eval"]
    assert len(evaluation) == 2 * 5 * preset.eval_seeds  # batch sizes x arms x seeds
    assert {int(r["seed"]) for r in evaluation} == {1, 2}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert all(r["end_filter_normalized"] and r["early_top_eigenvalue"] for r in rows)
    page = (tmp_path / "accuracy.md").read_text()
    assert "lightning-tvlars bench --quick" in page
    assert "| 128 | tvlars − lars-warmup | phase instead of warm-up (constant LR) |" in page
    assert "Spearman's rho with test accuracy" in page and "Partial results" not in page
    for figure in ("accuracy.png", "accuracy_sharpness.png", "curves.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    accuracy.main(["--quick", "--out", str(tmp_path)])  # resumed: nothing re-run
    assert len(_csv(tmp_path / "accuracy.csv")) == len(rows)
    (tmp_path / "accuracy.md").unlink()
    accuracy.main(["--quick", "--out", str(tmp_path), "--report-only"])
    page = (tmp_path / "accuracy.md").read_text()
    assert page.count("| tvlars − ") == 2 * 3
    assert f"Reproduce: `lightning-tvlars bench --quick --out {tmp_path}`" in page


def test_time_budget_stops_launching_and_reports_partial_results(tmp_path: Path) -> None:
    accuracy.main(["--quick", "--out", str(tmp_path), "--max-minutes", "0", "--no-curves"])
    assert not (tmp_path / "accuracy.csv").exists()
    assert "Partial results**: the protocol is not complete (the run was stopped or its time " in (
        (tmp_path / "accuracy.md").read_text()
    )


def test_a_setup_error_stops_after_the_first_failures(tmp_path: Path) -> None:
    preset = replace(PRESETS["cpu"].quick(), batch_sizes=(10**9,))  # larger than the data
    lines: list[str] = []
    rows, failures = runner.run_protocol(
        preset, tmp_path / "a.csv", device="cpu", jobs=1, log=lines.append
    )
    assert rows == [] and len(failures) == 1
    assert "exceeds the 700 training samples" in failures[0]
    assert "all failed: no more runs are started" in lines[-1]
    page = report.write_report(
        preset, rows, tmp_path, command="c", environment="e", failures=failures
    ).read_text()
    assert "the protocol is not complete (1 run(s) failed, listed below)" in page


def test_an_old_csv_or_another_presets_rows_are_refused(tmp_path: Path) -> None:
    (tmp_path / "accuracy.csv").write_text("task,optimizer,batch_size\nclassification,x,1\n")
    with pytest.raises(ValueError, match="not this benchmark's"):
        runner.read_rows(tmp_path / "accuracy.csv")
    path = tmp_path / "other.csv"
    runner.append_row(
        path, {**dict.fromkeys(runner.FIELDS, ""), "task": "classification", "epochs": 1}
    )
    with pytest.raises(ValueError, match="runs of 1 epochs, not the 60 of preset 'cpu'"):
        runner.run_protocol(PRESETS["cpu"], path, device="cpu", jobs=1)


GPU_QUICK = """
import sys
for name in ("lightly", "mnist1d", "jsonargparse"):
    sys.modules[name] = None  # what the GPU machine lacks: importing any of them fails
from lightning_tvlars.bench.accuracy import main
if __name__ == "__main__":
    main(sys.argv[1:])
"""


def test_gpu_preset_code_path_on_cpu_with_workers_and_without_lightly(tmp_path: Path) -> None:
    """``--preset gpu`` on a tiny size, on CPU, with two worker processes, in an interpreter
    where lightly, mnist1d and jsonargparse cannot be imported (the data comes from the cache,
    generated here first): Barlow Twins and its linear probe (classification runs the same
    ``train.run`` in the quick test), rows written as runs finish."""
    accuracy.main(["--preset", "gpu", "--quick", "--prepare-data"])
    script = tmp_path / "gpu_quick.py"
    script.write_text(textwrap.dedent(GPU_QUICK))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--preset",
            "gpu",
            "--quick",
            "--device",
            "cpu",
            "--jobs",
            "2",
            "--out",
            str(out),
            "--tasks",
            "barlow_twins",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _csv(out / "accuracy_gpu.csv")
    preset = replace(PRESETS["gpu"].quick(), tasks=("barlow_twins",))
    assert protocol.plan(preset, rows) == []
    assert {r["task"] for r in rows} == {"barlow_twins"}
    assert {r["arm"] for r in rows} == set(preset.arms["barlow_twins"])
    assert all(0.0 < float(r["train_accuracy"]) <= 1.0 for r in rows)
    assert "done, 1 running" in done.stdout or "done, 0 running" in done.stdout
    page = (out / "accuracy_gpu.md").read_text()
    assert "Barlow Twins (linear-probe test accuracy)" in page
    assert "Classification" not in page
    assert not (out / "curves.png").exists()  # the curves are a CPU figure


def test_the_command_refuses_bad_arguments_before_running_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            accuracy.main(list(argv))
        assert exit_info.value.code == 2
        return capsys.readouterr().err.splitlines()[-1].split("error: ", 1)[1]

    assert error("--quick", "--jobs=0") == "argument --jobs: 0 is invalid: expected an integer >= 1"
    assert error("--max-minutes=-1") == (
        "argument --max-minutes: -1 is invalid: expected a finite number >= 0"
    )
    assert error("--report-only", f"--out={tmp_path}") == (
        f"--report-only: no {tmp_path}/accuracy.csv to write the report from (--out {tmp_path})"
    )
    assert not list(tmp_path.iterdir())  # nothing was run or written


def test_bench_monitor_refuses_a_run_without_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_tvlars.bench import monitor

    with pytest.raises(SystemExit) as exit_info:
        monitor.main(["--steps=0"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("error: argument --steps: 0 is invalid: expected an integer >= 1")
    )
