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

# ------------------------------------------------------------------------------ statistics
# Reference values computed once with SciPy 1.17.1 (scipy.stats.ttest_ind(a, b,
# equal_var=False) and its confidence_interval(0.95), scipy.stats.t.ppf, scipy.stats.spearmanr)
# and by hand (the exact signed-rank and sign tests).

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
def test_welch_statistic_p_df_and_interval(
    a: list[float], b: list[float], expected: tuple[float, ...]
) -> None:
    t, p, df, low, high = expected
    result = stats.welch(a, b)
    assert result.t == pytest.approx(t, rel=1e-12)
    assert result.p == pytest.approx(p, rel=1e-9)
    assert result.df == pytest.approx(df, rel=1e-12)
    assert (result.low, result.high) == pytest.approx((low, high), rel=1e-9)
    assert result.diff == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert (result.n_a, result.n_b) == (len(a), len(b))


def test_t_quantile() -> None:
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706204736174694, rel=1e-10)
    assert stats.t_quantile(0.025, 7.3) == pytest.approx(-2.345066736547703, rel=1e-10)


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


def test_paired_tests_count_signs_and_give_exact_p_values() -> None:
    # 8 pairs, all a > b: both exact tests give 2 / 2^8
    every = stats.paired([float(i) for i in range(1, 9)], [0.0] * 8)
    assert (every.n, every.below, every.above, every.median) == (8, 0, 8, 4.5)
    assert every.p_wilcoxon == pytest.approx(2 / 256) and every.p_sign == pytest.approx(2 / 256)
    # the smallest difference negative: W- = 1, two sign patterns reach it -> 2 * 2 / 256;
    # the sign test sees 1 of 8: 2 * 9 / 256
    one = stats.paired([-1.0, 2, 3, 4, 5, 6, 7, 8], [0.0] * 8)
    assert (one.below, one.above) == (1, 7)
    assert one.p_wilcoxon == pytest.approx(4 / 256) and one.p_sign == pytest.approx(18 / 256)
    # non-finite pairs are dropped; with fewer than two non-zero differences nothing is tested
    few = stats.paired([1.0, math.nan, 2.0], [1.0, 0.0, 1.0])
    assert (few.n, few.below, few.above, few.p_wilcoxon, few.p_sign) == (2, 0, 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        stats.paired([1.0], [1.0, 2.0])


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


def test_spearman_with_ties_and_degenerate_samples() -> None:
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
        batch_sizes={"classification": (64,)},
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


def _peaked(centre: float, height: float = 0.9) -> Any:
    """Validation accuracy falling by 0.2 per decade away from ``centre`` (far beyond the
    validation noise of 100 samples: no grid extension)."""
    return lambda s: height - 0.2 * abs(math.log10(s.lr / centre))


def test_plan_tunes_lr_then_setting_on_two_seeds_then_evaluates_fresh_seeds() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    arm = ARMS["lars-warmup"]
    rows: list[dict[str, str]] = []
    first = _finish(preset, rows, _peaked(1.0))
    assert [s.lr for s in first] == [
        lr for lr in (0.3162, 0.5623, 1.0, 1.778, 3.162) for _ in (0, 1)
    ]
    assert [s.seed for s in first] == [0, 1] * 5  # every point on both tuning seeds
    assert {(s.role, s.stage, s.setting) for s in first} == {("tune", "lr", "warmup=0.2")}
    assert {s.probe_fraction for s in first} == {0.2}
    second = _finish(preset, rows, lambda s: {"warmup=0.4": 0.95}.get(s.setting, 0.1))
    assert [(s.stage, s.lr, s.setting, s.seed) for s in second] == [
        ("axis", 1.0, setting, seed)
        for setting in ("warmup=0.1", "warmup=0.4", "warmup=0.05")
        for seed in (0, 1)
    ]
    assert [s.probe_fraction for s in second[::2]] == [0.1, 0.4, 0.05]
    third = protocol.plan(preset, rows)
    assert preset.seeds == (2, 3, 4)  # fresh: after the tuning seeds
    assert [(s.role, s.seed, s.lr, s.setting) for s in third] == [
        ("eval", seed, 1.0, "warmup=0.4") for seed in (2, 3, 4)
    ]
    state = protocol.cell_state(preset, "classification", 64, arm, rows)
    assert (state.lr, state.setting, state.todo) == (1.0, "warmup=0.4", ())
    assert state.scores[(1.0, "warmup=0.2")] == pytest.approx(0.9)
    rows += [_row(s, 0.0) for s in third]
    assert protocol.plan(preset, rows) == []  # complete; a resume runs nothing


def test_selection_uses_the_mean_of_the_tuning_seeds_and_waits_for_both() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    rows: list[dict[str, str]] = []
    # seed 0 loves 0.5623, seed 1 loves 1.778; on the mean the centre wins
    lucky = {(0.5623, 0): 0.95, (1.778, 1): 0.95, (1.0, 0): 0.9, (1.0, 1): 0.9}
    todo = protocol.plan(preset, rows)
    rows += [_row(s, lucky.get((s.lr, s.seed), 0.5)) for s in todo if s.seed == 0]
    assert {s.stage for s in protocol.plan(preset, rows)} == {"lr"}  # seed 1 still missing
    rows += [_row(s, lucky.get((s.lr, s.seed), 0.5)) for s in todo if s.seed == 1]
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup"], rows)
    assert state.lr == 1.0  # 0.9 on average against 0.725


def test_within_noise_is_one_standard_error_of_the_difference() -> None:
    # p = 0.9 on both sides, 3000 samples, 2 seeds: sqrt(2 * 0.09 / 6000) = 0.00548
    assert protocol.within_noise(0.9, 0.8946, 3000, 2)
    assert not protocol.within_noise(0.9, 0.8944, 3000, 2)
    assert protocol.within_noise(0.9, 0.9, 3000, 2)


def test_plan_extends_the_grid_past_an_edge_at_most_twice_per_side() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    rows: list[dict[str, str]] = []
    increasing = lambda s: 0.5 + 0.04 * s.lr  # noqa: E731 - the largest rate is best
    _finish(preset, rows, increasing)
    assert {s.lr for s in _finish(preset, rows, increasing)} == {5.623}
    assert {s.lr for s in _finish(preset, rows, increasing)} == {10.0}
    after = _finish(preset, rows, increasing)  # still the edge, but no third extension upwards
    assert {(s.stage, s.lr) for s in after} == {("axis", 10.0)}
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup"], rows)
    assert state.grid == (-2, -1, 0, 1, 2, 3, 4)
    # downwards; once the extension is clearly worse, the old edge is interior and chosen
    rows = []
    near = _peaked(0.3162)
    _finish(preset, rows, near)
    assert {s.lr for s in _finish(preset, rows, near)} == {0.1778}
    assert {(s.stage, s.lr) for s in _finish(preset, rows, near)} == {("axis", 0.3162)}


def test_an_edge_within_the_noise_of_an_interior_best_is_extended() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    rows: list[dict[str, str]] = []
    # best at 1.778 (interior), the top edge 3.162 one validation sample below it
    plateau = {1.778: 0.90, 3.162: 0.89}
    score = lambda s: plateau.get(s.lr, 0.6)  # noqa: E731
    _finish(preset, rows, score)
    assert {s.lr for s in _finish(preset, rows, score)} == {5.623}  # beyond the near edge
    assert {(s.stage, s.lr) for s in _finish(preset, rows, score)} == {("axis", 1.778)}
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup"], rows)
    assert state.grid == (-2, -1, 0, 1, 2, 3)


def test_plan_ties_go_to_the_smaller_rate_and_the_default_setting() -> None:
    preset = _tiny(arms={"classification": ("lars-warmup",)})
    rows: list[dict[str, str]] = []
    _finish(preset, rows, lambda s: 0.9 if s.lr in (0.5623, 1.778) else 0.1)
    _finish(preset, rows, lambda s: 0.9)
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup"], rows)
    assert (state.lr, state.setting) == (0.5623, "warmup=0.2")


def test_an_arm_without_warmup_evaluates_after_its_paired_warmup_and_probes_at_its_end() -> None:
    preset = _tiny(arms={"classification": ("tvlars", "lars", "lars-warmup")})
    rows: list[dict[str, str]] = []

    def score(s: RunSpec) -> float:
        return {"warmup=0.1": 0.95, "half=1": 0.95}.get(s.setting, _peaked(1.0)(s))

    first = _finish(preset, rows, score)
    assert {s.probe_fraction for s in first if s.arm in ("tvlars", "lars")} == {0.2}
    assert {s.setting for s in first if s.arm == "tvlars"} == {"half=0.3"}
    assert {s.setting for s in first if s.arm == "lars"} == {"trust=0.001"}
    # finish the arms without warm-up: their evaluation waits for lars-warmup's choice
    for _ in range(2):
        rows += [_row(s, score(s)) for s in protocol.plan(preset, rows) if s.arm != "lars-warmup"]
    assert not [s for s in protocol.plan(preset, rows) if s.arm != "lars-warmup"]
    _finish(preset, rows, score)
    evaluation = [s for s in protocol.plan(preset, rows) if s.arm == "tvlars"]
    assert [(s.seed, s.setting, s.probe_fraction) for s in evaluation] == [
        (seed, "half=1", 0.1) for seed in (2, 3, 4)
    ]


def test_warmup_phase_takes_the_phase_chosen_for_tvlars() -> None:
    preset = _tiny(arms={"classification": ("tvlars", "lars-warmup-phase")})
    rows: list[dict[str, str]] = []

    def score(s: RunSpec) -> float:
        return 0.95 if "authors" in s.setting else _peaked(1.0)(s)

    assert {s.arm for s in _finish(preset, rows, score)} == {"tvlars"}  # it waits
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup-phase"], rows)
    assert state.waiting == "tvlars" and state.todo == ()
    _finish(preset, rows, score)  # tvlars's axis: "authors" wins
    offered = protocol.plan(preset, rows)
    mine = [s for s in offered if s.arm == "lars-warmup-phase"]
    assert {(s.stage, s.setting, s.probe_fraction) for s in mine} == {
        ("lr", "warmup=0.2+authors", 0.2)
    }
    while offered := _finish(preset, rows, score):
        pass
    state = protocol.cell_state(preset, "classification", 64, ARMS["lars-warmup-phase"], rows)
    assert state.settings == tuple(f"{w}+authors" for w in protocol.WARMUPS)
    assert state.setting is not None and state.setting.endswith("+authors")
    with pytest.raises(ValueError, match="takes the phase of 'tvlars': add it"):
        _tiny(arms={"classification": ("lars-warmup-phase",)})


def test_plan_puts_the_largest_batch_first_across_tasks() -> None:
    both = ("classification", "barlow_twins")
    preset = _tiny(
        tasks=both,
        batch_sizes={"classification": (32, 64), "barlow_twins": (64,)},
        arms=dict.fromkeys(both, ("lars-warmup",)),
    )
    order = [(s.batch_size, s.task) for s in protocol.plan(preset, [])]
    assert order[::10] == [(64, both[0]), (64, both[1]), (32, both[0])]


def test_preset_grids_and_validation() -> None:
    cpu = PRESETS["cpu"]
    assert cpu.seeds == tuple(range(2, 10)) and not set(cpu.tune_seeds) & set(cpu.seeds)
    assert [cpu.lr(ARMS["lamb-warmup-cosine"], "classification", k) for k in (-2, 0, 2)] == [
        0.003162,
        0.01,
        0.03162,
    ]
    # every arm's second axis has the same size: equal tuning budgets; the authors' phase in
    assert {len(cpu.axis(ARMS[a])) for a in ARMS} == {3}
    assert cpu.axis(ARMS["tvlars"]) == ("half=0.3", "authors", "half=1")
    assert set(cpu.arms["barlow_twins"]) == {
        "tvlars",
        "lars",
        "lars-warmup-cosine",
        "lamb-warmup-cosine",
        "tvlamb",
    }
    with pytest.raises(ValueError, match="arm 'sgd' is invalid"):
        _tiny(arms={"classification": ("sgd",)})
    with pytest.raises(ValueError, match="task 'gan' is invalid"):
        _tiny(tasks=("gan",))
    for preset in PRESETS.values():  # at least 7 steps per epoch at every batch size
        train_size = 0.8 * preset.num_samples - preset.val_size
        assert all(max(preset.batch_sizes[t]) * 7 <= train_size + 300 for t in preset.tasks)


def test_the_deeper_model_has_layers_to_adapt() -> None:
    size = protocol.MODELS["deep_classification"]
    model = train.classifier(size.width, size.blocks)
    assert sum(p.numel() for p in model.parameters()) >= 100_000
    assert sum(p.ndim > 1 for p in model.parameters()) >= 20  # the adapted tensors


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Preset:
    return _tiny(
        num_samples=600,
        val_size=60,
        models=dict.fromkeys(protocol.TASKS, protocol.Model(4, 1)),
        projection_dim=16,
        probe=Probe(64, 3, 2, 2),
    )


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
        size = preset.models[spec.task]
        self.net = train.classifier(size.width, size.blocks)
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
        ("lars", "trust=0.002", 1.0),
        ("lars-warmup-phase", "warmup=0.1+half=0.3", 1.0),
        ("lars-warmup-cosine", "warmup=0.2", 1.0),
        ("lamb-warmup-cosine", "warmup=0.1", 0.01),
        ("tvlamb", "authors", 0.01),
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
    with pytest.raises(ValueError, match="it has no phase"):
        phase("warmup=0.1")
    assert phase("warmup=0.1+half=0.1")(100) == pytest.approx(0.5)  # a warm-up arm's phase


def test_arm_settings_become_the_recipe() -> None:
    def config(arm: str, setting: str) -> Any:
        spec = RunSpec("classification", arm, 64, 0, "tune", "lr", 1.0, setting, 0.2)
        return train.arm_config(ARMS[arm], spec, 1000)

    authors = config("tvlars", "authors")
    assert (authors.phase.mode, authors.norm_clip) == ("explicit", 10.0)  # the authors' clamp
    assert config("tvlars", "half=0.3").norm_clip is None
    assert config("tvlamb", "authors").optimizer == "lamb"  # LAMB has no norm clamp
    plain = config("lars", "trust=0.002")
    assert (plain.phase.mode, plain.warmup_fraction, plain.trust_coefficient) == ("off", 0.0, 0.002)
    both = config("lars-warmup-phase", "warmup=0.1+half=0.3")
    assert (both.phase.mode, both.phase.half_at, both.warmup_fraction) == ("fitted", 0.3, 0.1)
    cosine = config("lamb-warmup-cosine", "warmup=0.4")
    assert (cosine.lr_schedule, cosine.lr_scaling, cosine.phase.mode) == ("cosine", "sqrt", "off")
    with pytest.raises(ValueError, match="no warmup="):
        config("lars-warmup", "half=0.3")


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


def test_rows_name_the_code_and_the_model_size(tiny_data: Preset) -> None:
    spec = RunSpec("classification", "tvlars", 64, 0, "tune", "lr", 1.0, "half=0.3", 0.2)
    row = train.run(spec, tiny_data, "cpu")
    assert set(row) == set(runner.FIELDS)
    assert row["model_params"] == sum(p.numel() for p in train.classifier(4, 1).parameters())
    head = subprocess.run(
        ["git", "-C", str(Path(train.__file__).parents[2]), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
    )
    if head.returncode == 0:  # a git checkout: the commit (and +dirty if the package differs)
        assert row["code_version"].split("+")[0] == head.stdout.strip()
    else:
        from lightning_tvlars import __version__

        assert row["code_version"] == __version__


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
    state = protocol.CellState(1.0, "x", (0,), {}, (), ())
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
    assert results[("tvlars", "lars-warmup")].isolates == (
        "phase (start and decay) vs warm-up (start only), constant LR"
    )


def test_sharpness_is_compared_per_seed_with_holm() -> None:
    preset = _tiny(arms={"classification": ("tvlars", "lars-warmup")})
    state = protocol.CellState(1.0, "x", (0,), {}, (), ())
    flat = [0.1, 0.2, 0.15, 0.3, 0.25, 0.12, 0.18, 0.22]

    def cell(arm: str, sharpness: list[float]) -> report.Cell:
        rows = [
            {**r, **dict.fromkeys(report.PAIRED_MEASURES, str(v))}
            for r, v in zip(_eval_rows(arm, [0.9] * 8), sharpness, strict=True)
        ]
        return report.Cell("classification", 64, arm, state, tuple(rows))

    # lars-warmup sharper on every seed, by a seed-dependent amount (a Welch test on the
    # medians would see overlapping spreads; the pairs do not)
    cells = [
        cell("tvlars", flat),
        cell("lars-warmup", [v + 0.01 * (i + 1) for i, v in enumerate(flat)]),
    ]
    results = report.sharpness_comparisons(preset, cells)
    assert {r.measure for r in results} == set(report.PAIRED_MEASURES)
    assert all(
        (r.a, r.b, r.test.below, r.test.above) == ("tvlars", "lars-warmup", 8, 0) for r in results
    )
    assert all(r.test.p_wilcoxon == pytest.approx(2 / 256) for r in results)
    assert [r.p_holm for r in results] == pytest.approx([4 * 2 / 256] * 4)
    table = "\n".join(report.paired_sharpness_table(results, "classification"))
    assert "| 64 | tvlars − lars-warmup | early, filter-norm. | 8 | 8 | 0 |" in table
    assert table.count("**a flatter**") == 4


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
    state = protocol.CellState(1.0, "x", (0,), {}, (), ())
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
    assert {r["task"] for r in rows} == {"classification", "barlow_twins"}
    evaluation = [r for r in rows if r["role"] == "eval"]
    # (batch sizes x arms) per task x seeds
    assert len(evaluation) == (2 * 8 + 1 * 5) * preset.eval_seeds
    assert {int(r["seed"]) for r in evaluation} == {1, 2}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert all(r["end_filter_normalized"] and r["early_top_eigenvalue"] for r in rows)
    page = (tmp_path / "accuracy.md").read_text()
    assert "lightning-tvlars bench --quick" in page
    assert (
        "| 128 | tvlars − lars | the phase, without warm-up (the paper's claim; constant LR) |"
        in page
    )
    assert "- Classification (test accuracy): 16 of 16 cells complete." in page
    assert "Spearman's rho with test accuracy" in page and "Partial results" not in page
    for figure in ("accuracy.png", "accuracy_sharpness.png", "curves.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    accuracy.main(["--quick", "--out", str(tmp_path)])  # resumed: nothing re-run
    assert len(_csv(tmp_path / "accuracy.csv")) == len(rows)
    (tmp_path / "accuracy.md").unlink()
    accuracy.main(["--quick", "--out", str(tmp_path), "--report-only"])
    page = (tmp_path / "accuracy.md").read_text()
    # tvlars − {lars, lars-warmup-phase, lars-warmup, lars-warmup-cosine, lamb-warmup-cosine}
    # at two batch sizes, and − {lars, lars-warmup-cosine, lamb-warmup-cosine} at one (BT)
    compared = [line for line in page.splitlines() if "| tvlars − " in line and "[" in line]
    assert len(compared) == 2 * 5 + 3
    assert f"Reproduce: `lightning-tvlars bench --quick --out {tmp_path}`" in page


def test_time_budget_stops_launching_and_reports_partial_results(tmp_path: Path) -> None:
    accuracy.main(["--quick", "--out", str(tmp_path), "--max-minutes", "0", "--no-curves"])
    assert not (tmp_path / "accuracy.csv").exists()
    assert "Partial results**: the protocol is not complete (the run was stopped or its time " in (
        (tmp_path / "accuracy.md").read_text()
    )


def test_a_setup_error_stops_after_the_first_failures(tmp_path: Path) -> None:
    quick = PRESETS["cpu"].quick()
    preset = replace(quick, batch_sizes=dict.fromkeys(quick.tasks, (10**9,)))  # > the data
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
    with pytest.raises(ValueError, match="runs of 1 epochs, not the 30 of preset 'cpu'"):
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
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line, without the usage
        return err.split("error: ", 1)[1].rstrip("\n")

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
