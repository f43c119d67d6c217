"""Sharpness measures: exact answers on quadratics, scale invariance, no side effects, callback."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_tvlars.lightning.sharpness import SharpnessProbe
from lightning_tvlars.sharpness import (
    SharpnessReport,
    evaluation_mode,
    filter_normalized_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    measure_sharpness,
    preserved_grads,
)

KEYS = ("top_eigenvalue", "trace", "filter_normalized")


def _quadratic(
    eigenvalues: Tensor, seed: int = 0, diagonal: bool = False
) -> tuple[Callable[[], Tensor], list[Tensor], Tensor]:
    """``0.5 w^T A w`` over two parameter tensors (a matrix and a vector) holding ``w``."""
    gen = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    if diagonal:
        a = torch.diag(eigenvalues)
    else:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        a = q @ torch.diag(eigenvalues) @ q.T
    matrix = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    vector = torch.randn(n - 12, generator=gen, dtype=torch.float64, requires_grad=True)

    def loss() -> Tensor:
        w = torch.cat([matrix.reshape(-1), vector])
        return 0.5 * w @ a @ w

    return loss, [matrix, vector], a


# ---------------------------------------------------------------- Hessian measures


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic() -> None:
    eigenvalues = torch.cat(
        [torch.tensor([10.0, 5.0, -3.0]), torch.linspace(-2.0, 4.0, 17)]
    ).double()
    loss, params, _ = _quadratic(eigenvalues)
    top = hessian_top_eigenvalue(loss, params, iterations=50, tol=1e-12)
    assert top == pytest.approx(10.0, rel=1e-4)
    # A dominant negative eigenvalue wins: power iteration finds the largest magnitude.
    loss, params, _ = _quadratic(-eigenvalues)
    assert hessian_top_eigenvalue(loss, params, iterations=50, tol=1e-12) == pytest.approx(
        -10.0, rel=1e-4
    )


def test_power_iteration_stops_at_the_tolerance() -> None:
    eigenvalues = torch.cat([torch.tensor([10.0]), torch.linspace(0.0, 1.0, 19)]).double()
    _, params, a = _quadratic(eigenvalues)
    model = nn.ParameterList(params)

    def loss() -> Tensor:
        w = torch.cat([model[0].reshape(-1), model[1]])
        return 0.5 * w @ a @ w

    loose = measure_sharpness(loss, model, measures=["top_eigenvalue"], tol=1e-3)
    assert loose.hessian_vector_products < 10  # ratio 0.1: converged in a few products
    assert loose.top_eigenvalue == pytest.approx(10.0, rel=1e-3)


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian() -> None:
    eigenvalues = torch.linspace(-1.0, 7.0, 20).double()
    loss, params, _ = _quadratic(eigenvalues, diagonal=True)
    # z^T D z = sum_i d_i z_i^2 = tr(D) for every Rademacher z: one probe is enough.
    assert hessian_trace(loss, params, samples=1) == pytest.approx(float(eigenvalues.sum()), 1e-12)


def test_hutchinson_trace_of_a_dense_hessian_within_a_few_percent() -> None:
    eigenvalues = torch.linspace(1.0, 10.0, 20).double()
    loss, params, a = _quadratic(eigenvalues)
    estimate = hessian_trace(loss, params, samples=2000)
    assert estimate == pytest.approx(float(eigenvalues.sum()), rel=0.03)
    # ... and the estimate is not exact (the off-diagonal terms are noise): a real estimator.
    assert estimate != pytest.approx(float(torch.trace(a)), rel=1e-9)


def test_gradient_free_tensors_and_linear_losses_have_zero_curvature() -> None:
    w = torch.randn(5, requires_grad=True)
    assert hessian_top_eigenvalue(lambda: w.sum() * 3.0, [w]) == 0.0
    assert hessian_trace(lambda: w.sum() * 3.0, [w], samples=3) == 0.0


# ---------------------------------------------------------------- scale invariance


def _relu_net(conv: bool) -> nn.Sequential:
    torch.manual_seed(0)
    if conv:
        layers: list[nn.Module] = [
            nn.Conv1d(1, 6, 3),
            nn.ReLU(),
            nn.Conv1d(6, 4, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4, 3),
        ]
    else:
        layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
def test_filter_normalized_measure_is_invariant_to_rescaling_a_relu_layer(conv: bool) -> None:
    model = _relu_net(conv)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 8, generator=gen).double() if conv else torch.randn(64, 8).double()
    y = torch.randint(0, 3, (64,), generator=gen)

    def loss() -> Tensor:
        return F.cross_entropy(model(x), y)

    def measures() -> dict[str, float]:
        def seeded() -> torch.Generator:
            return torch.Generator().manual_seed(7)

        return {
            "filter": filter_normalized_sharpness(loss, model, 0.5, 4, generator=seeded()).mean,
            "layer": filter_normalized_sharpness(loss, model, 0.5, 4, "layer", seeded()).mean,
            "none": filter_normalized_sharpness(loss, model, 0.5, 4, "none", seeded()).mean,
            "eigenvalue": hessian_top_eigenvalue(loss, model, 50, 1e-8, seeded()),
        }

    before, logits = measures(), model(x)
    with torch.no_grad():  # ReLU(c z) = c ReLU(z): the function does not change
        model[0].weight.mul_(10.0)
        model[0].bias.mul_(10.0)
        model[2].weight.div_(10.0)
    torch.testing.assert_close(model(x), logits)
    after = measures()
    assert before["filter"] > 1e-3  # a real increase, not noise around zero
    assert after["filter"] == pytest.approx(before["filter"], rel=1e-6)
    assert after["layer"] == pytest.approx(before["layer"], rel=1e-6)
    # Unnormalized directions and the Hessian see the rescaling though the function is the same.
    assert after["none"] != pytest.approx(before["none"], rel=0.5)
    assert after["eigenvalue"] != pytest.approx(before["eigenvalue"], rel=0.5)


# ---------------------------------------------------------------- no side effects


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 6, 3),
        nn.LayerNorm(3),
    )


def test_measurement_leaves_grads_weights_statistics_and_modes_as_they_were() -> None:
    model = _bn_net()
    x, y = torch.randn(32, 1, 8), torch.randint(0, 3, (32,))
    F.cross_entropy(model(x), y).backward()  # grads present, and BN statistics non-trivial
    model[5].bias.grad = None  # one gradient is None
    model[6].eval()  # a submodule in eval mode on purpose: its own flag must survive
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: g.clone() for n, g in grads.items() if g is not None}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]

    report = measure_sharpness(lambda: F.cross_entropy(model(x), y), model, directions=3)

    assert all(getattr(report, key) is not None for key in KEYS)
    for name, p in model.named_parameters():
        assert p.grad is grads[name], name  # the same object (None stays None) ...
        if p.grad is not None:
            assert torch.equal(p.grad, grad_values[name]), name  # ... with the same values
    for key, value in model.state_dict().items():  # weights and BN running statistics
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == modes


def _stale_statistics_net() -> nn.Sequential:
    """A BatchNorm net whose running statistics are far from the data's (as after a big step)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        net[1].running_mean.fill_(50.0)
        net[1].running_var.fill_(1e-4)
    return net


def test_batch_statistics_measure_the_training_loss_running_statistics_the_stale_one() -> None:
    """The probe's default normalizes as training does; "running" sees the stale statistics."""
    net = _stale_statistics_net()
    x = torch.randn(64, 8)
    y = net.train()(x).argmax(dim=1)  # labels the train-mode net fits: low loss in train mode
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        train_loss = F.cross_entropy(net.train()(x), y).item()
        net.load_state_dict(state)  # the train-mode forward moved the running statistics
        net.eval()

    batch = measure_sharpness(lambda: F.cross_entropy(net(x), y), net, measures=["trace"])
    running = measure_sharpness(
        lambda: F.cross_entropy(net(x), y), net, measures=["trace"], batch_norm="running"
    )

    assert batch.loss == pytest.approx(train_loss, rel=1e-6)
    assert train_loss < math.log(3) < running.loss  # stale statistics: worse than chance
    assert not net.training and not net[1].training  # modes restored
    for key, value in net.state_dict().items():  # running statistics untouched by either
        assert torch.equal(value, state[key]), key


def test_sync_batch_norm_probes_this_rank_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a multi-process job, SyncBatchNorm would all-gather; the probe (one rank) must not."""
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    sync[1].load_state_dict(net[1].state_dict())
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="expected input tensor"):  # its own multi-process path
        sync.train()(x)
    sync.eval()

    report = measure_sharpness(lambda: F.cross_entropy(sync(x), y), sync, measures=["trace"])
    expected = measure_sharpness(lambda: F.cross_entropy(net(x), y), net, measures=["trace"])

    assert report.loss == pytest.approx(expected.loss, rel=1e-6)
    assert report.trace == pytest.approx(expected.trace, rel=1e-5)
    assert "forward" not in vars(sync[1])  # the class's own forward is back


def test_batch_norm_statistics_are_checked() -> None:
    net = _stale_statistics_net()
    with pytest.raises(ValueError, match=r"batch_norm='train' is invalid.*'batch', 'running'"):
        measure_sharpness(lambda: net(torch.randn(4, 8)).sum(), net, batch_norm="train")  # type: ignore[arg-type]


def test_weights_are_restored_when_the_loss_fails_mid_probe() -> None:
    model = _bn_net()
    x = torch.randn(16, 1, 8)
    weights = [p.detach().clone() for p in model.parameters()]
    calls = 0

    def loss() -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:  # inside the perturbed evaluations
            raise RuntimeError("boom")
        return model(x).square().mean()

    with pytest.raises(RuntimeError, match="boom"):
        filter_normalized_sharpness(loss, model)
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
    assert model.training and model[1].training


def test_preserved_grads_drops_what_the_block_accumulates() -> None:
    w = torch.ones(3, requires_grad=True)
    v = torch.ones(2, requires_grad=True)
    w.grad = torch.full((3,), 5.0)
    original = w.grad
    with preserved_grads([w, v]):
        (w.sum() + v.sum()).backward()
    assert w.grad is original and torch.equal(w.grad, torch.full((3,), 5.0))
    assert v.grad is None


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    model = _bn_net()
    x, y = torch.randn(32, 1, 8), torch.randint(0, 3, (32,))

    def loss() -> Tensor:
        return F.cross_entropy(model(x), y)

    def values(seed: int) -> tuple[Any, ...]:
        r = measure_sharpness(loss, model, seed=seed, directions=2, trace_samples=3)
        return (r.loss, r.top_eigenvalue, r.trace, r.filter_normalized, r.filter_normalized_max)

    global_state = torch.get_rng_state()
    assert values(0) == values(0)
    assert values(0)[2:] != values(1)[2:]
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was not touched
    assert values(0)[0] == values(1)[0]  # the loss itself does not depend on the seed


def test_report_metrics_keep_the_measured_values_only() -> None:
    report = SharpnessReport(step=3, loss=1.5, trace=2.0, trace_stderr=0.1)
    assert report.metrics() == {
        "tvlars/sharpness/loss": 1.5,
        "tvlars/sharpness/trace": 2.0,
        "tvlars/sharpness/trace_stderr": 0.1,
    }


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda f, m: hessian_top_eigenvalue(f, m, iterations=0), ValueError, "iterations=0 is"),
        (lambda f, m: hessian_top_eigenvalue(f, m, tol=-1.0), ValueError, "tol=-1.0 is invalid"),
        (lambda f, m: hessian_top_eigenvalue(f, m, generator=3), TypeError, "generator=3 is"),
        (lambda f, m: hessian_trace(f, m, samples=0), ValueError, "samples=0 is invalid"),
        (lambda f, m: hessian_trace(f, m.weight), TypeError, "params=<Tensor> is invalid"),
        (lambda f, m: hessian_trace(f, [m.weight.detach()]), ValueError, "requires_grad"),
        (lambda f, m: hessian_trace(f, [1.0]), TypeError, "item of type float"),
        (lambda f, m: hessian_trace(f, nn.ReLU()), ValueError, "no trainable parameter"),
        (lambda f, m: filter_normalized_sharpness(f, m, radius=0), ValueError, "radius=0 is"),
        (lambda f, m: filter_normalized_sharpness(f, m, directions=1.5), TypeError, "directions"),
        (lambda f, m: filter_normalized_sharpness(f, m, norm="unit"), ValueError, "norm='unit'"),
        (
            lambda f, m: filter_normalized_sharpness(f, [m.weight]),
            TypeError,
            "model=<list> is invalid",
        ),
        (lambda f, m: measure_sharpness(f, m, measures=["curvature"]), ValueError, "measures="),
        (lambda f, m: measure_sharpness(f, m, measures="trace"), TypeError, "measures='trace'"),
        (lambda f, m: measure_sharpness(f, m, measures=[]), ValueError, r"measures=\[\] is"),
        (lambda f, m: measure_sharpness(f, m, seed=-1), ValueError, "seed=-1 is invalid"),
        (lambda f, m: measure_sharpness(f, m, seed=1.0), TypeError, "seed=1.0 is invalid"),
        (lambda f, m: hessian_trace(lambda: m(torch.ones(2, 4)), m), ValueError, r"\(2, 2\)"),
        (lambda f, m: hessian_trace(lambda: torch.ones(()), m), ValueError, "does not require"),
    ],
)
def test_bad_arguments_name_the_argument(
    call: Callable[[Callable[[], Tensor], nn.Linear], object], error: type[Exception], match: str
) -> None:
    model = nn.Linear(4, 2)

    def loss() -> Tensor:
        return model(torch.ones(3, 4)).square().mean()

    with pytest.raises(error, match=match):
        call(loss, model)


# ---------------------------------------------------------------- the Lightning callback


class _Classifier(pl.LightningModule):
    """BN, Dropout, a torchmetrics metric and ``self.log`` in ``training_step``."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.net = _bn_net()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(3, average="micro")
        self.calls = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.accuracy(logits, y)
        self.log("train/loss", loss)
        self.log("train/acc", self.accuracy, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n: int = 96) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 1, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    )


def _fit(
    tmp_path: Path, callbacks: list[pl.Callback], max_steps: int = 5, **kwargs: Any
) -> tuple[_Classifier, list[dict[str, str]]]:
    torch.manual_seed(0)
    model = _Classifier()
    kwargs.setdefault("devices", 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=CSVLogger(tmp_path, version=0),  # fixed: a spawned rank 0 names it too
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, DataLoader(_data(), batch_size=16, shuffle=True))
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return model, list(csv.DictReader(f))


def _probe_rows(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    found = {}
    for row in rows:
        values = {k.split("/")[-1]: float(v) for k, v in row.items() if "sharpness" in k and v}
        if values:
            found[int(row["step"])] = values
    return found


def test_probe_logs_every_n_steps_and_at_the_end_and_fills_history(tmp_path: Path) -> None:
    probe = SharpnessProbe(every_n_steps=2, num_samples=40, iterations=5, trace_samples=2)
    _, rows = _fit(tmp_path, [probe])
    logged = _probe_rows(rows)
    assert sorted(logged) == [2, 4, 5] == [r.step for r in probe.history]
    for report in probe.history:
        assert set(logged[report.step]) >= set(KEYS)
        assert logged[report.step]["top_eigenvalue"] == pytest.approx(report.top_eigenvalue)
        assert report.num_samples == 40 and report.hessian_vector_products <= 5 + 2
        assert all(math.isfinite(getattr(report, k)) for k in KEYS)
    assert probe.batch[0].shape == (40, 1, 8)


def test_probe_at_chosen_steps_with_a_given_batch_and_loss_fn(tmp_path: Path) -> None:
    x, y = _data(20).tensors
    seen = []

    def loss_fn(module: pl.LightningModule, batch: tuple[Tensor, Tensor]) -> Tensor:
        seen.append(batch[0].shape[0])
        return F.cross_entropy(module.net(batch[0]), batch[1])

    probe = SharpnessProbe(
        at_steps=(0, 3), at_end=False, batch=(x, y), loss_fn=loss_fn, measures=["trace"]
    )
    _, rows = _fit(tmp_path, [probe])
    assert [r.step for r in probe.history] == [0, 3]
    assert sorted(_probe_rows(rows)) == [0, 3]
    assert set(_probe_rows(rows)[3]) == {"trace", "trace_stderr", "loss"}
    assert set(seen) == {20}
    net = _bn_net()
    with torch.no_grad(), evaluation_mode(net):  # the module at step 0: dropout off, BN on x
        reference = F.cross_entropy(net(x), y).item()
    assert probe.history[0].loss == pytest.approx(reference, rel=1e-6)


@pytest.mark.usefixtures("free_port")
def test_probing_does_not_change_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights, BN statistics, logged loss and epoch accuracy with and without the probe.

    The probe calls ``training_step`` (which logs and updates a metric) on a batch it draws
    from the shuffled training set: none of that may leak into training or the logs. The DDP
    run (one gloo process) probes the unwrapped module while DDP's reducer owns the gradients.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else DDP sets the thread count (and the bits)
    # DDP's setup re-seeds from PL_GLOBAL_SEED when an earlier seed_everything left it set: the
    # DDP run would then shuffle its batches in another order than the plain run
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every run below with the one thread DDP will use: same bits
    try:
        _probing_leaves_training_unchanged(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _probing_leaves_training_unchanged(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    plain, plain_rows = _fit(tmp_path / "plain", [], max_steps=6)
    for name, strategy in [("single", "auto"), ("ddp", DDPStrategy(process_group_backend="gloo"))]:
        probe = SharpnessProbe(every_n_steps=1, num_samples=24, iterations=3, trace_samples=2)
        try:
            probed, rows = _fit(
                tmp_path / name,
                [probe],
                max_steps=6,
                strategy=strategy,
                use_distributed_sampler=False,  # the same shuffled order as the plain run
            )
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        for (key, a), b in zip(
            probed.state_dict().items(), plain.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"{name}: {key}"
        strip = [{k: v for k, v in row.items() if "sharpness" not in k} for row in rows]
        assert [r for r in strip if any(v for k, v in r.items() if k != "step")] == plain_rows
        assert [r.step for r in probe.history] == [1, 2, 3, 4, 5, 6], name


def test_only_global_rank_zero_measures() -> None:
    class Rank1:
        global_step, is_global_zero, loggers = 4, False, ()

    probe = SharpnessProbe(every_n_steps=2, loss_fn=lambda m, b: pytest.fail("measured"))
    probe.on_train_batch_end(Rank1(), _Classifier())  # type: ignore[arg-type]
    assert probe.history == [] and probe._last_step == 4


def test_gradient_accumulation_measures_each_step_once(tmp_path: Path) -> None:
    probe = SharpnessProbe(every_n_steps=1, num_samples=16, measures=["filter_normalized"])
    _fit(tmp_path, [probe], max_steps=3, accumulate_grad_batches=2)
    assert [r.step for r in probe.history] == [1, 2, 3]


def test_captured_batch_is_a_seeded_subset_whatever_the_loader_order() -> None:
    data = _data(50)
    a = SharpnessProbe(every_n_steps=1, num_samples=10, seed=3)._capture(
        DataLoader(data, batch_size=4, shuffle=True)
    )
    b = SharpnessProbe(every_n_steps=1, num_samples=10, seed=3)._capture(
        DataLoader(data, batch_size=7)
    )
    c = SharpnessProbe(every_n_steps=1, num_samples=10, seed=4)._capture(
        DataLoader(data, batch_size=7)
    )
    assert a[0].shape == (10, 1, 8) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    whole = SharpnessProbe(every_n_steps=1, num_samples=500)._capture(DataLoader(data))
    assert torch.equal(whole[0], data.tensors[0])  # smaller data set: all of it, in order


def test_iterable_datasets_give_their_first_samples() -> None:
    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            yield from zip(*_data(50).tensors, strict=True)

    batch = SharpnessProbe(every_n_steps=1, num_samples=10)._capture(
        DataLoader(Stream(), batch_size=4)
    )
    assert batch[0].shape == (10, 1, 8)
    assert torch.equal(batch[0], _data(50).tensors[0][:10])


def test_probe_state_survives_a_checkpoint_round_trip() -> None:
    probe = SharpnessProbe(every_n_steps=2)
    probe.history = [SharpnessReport(step=2, loss=1.0, trace=3.0)]
    probe._last_step = 2
    restored = SharpnessProbe(every_n_steps=2)
    restored.load_state_dict(probe.state_dict())
    assert restored.history == probe.history and restored._last_step == 2
    assert probe.state_key != SharpnessProbe(every_n_steps=3).state_key


def test_manual_optimization_needs_a_loss_fn(tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="loss_fn=None is invalid with manual optimization"):
        SharpnessProbe(every_n_steps=1).setup(trainer, _Classifier(manual=True), "fit")
    SharpnessProbe(every_n_steps=1, loss_fn=lambda m, b: m.net(b[0]).sum()).setup(
        trainer, _Classifier(manual=True), "fit"
    )


def test_sharded_strategies_are_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)  # no process group needed

    probe = SharpnessProbe(every_n_steps=1)
    with pytest.raises(ValueError, match="strategy=FSDPStrategy is not supported"):
        probe.setup(FakeTrainer(), _Classifier(), "fit")  # type: ignore[arg-type]
    probe.setup(FakeTrainer(), _Classifier(), "test")  # type: ignore[arg-type]  # inactive


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps=0 is invalid"),
        ({"every_n_steps": 2.0}, TypeError, "every_n_steps=2.0 is invalid"),
        ({"at_steps": 3}, TypeError, "at_steps=3 is invalid"),
        ({"at_steps": [1, -2]}, ValueError, r"at_steps=\[1, -2\] is invalid"),
        ({"at_end": "yes"}, TypeError, "at_end='yes' is invalid"),
        ({"at_end": False}, ValueError, "leave nothing to measure"),
        ({"num_samples": 0, "at_end": True}, ValueError, "num_samples=0 is invalid"),
        ({"loss_fn": "mse"}, TypeError, "loss_fn='mse' is invalid"),
        ({"measures": ("trace", "hessian")}, ValueError, "measures=.* is invalid"),
        ({"iterations": -1}, ValueError, "iterations=-1 is invalid"),
        ({"tol": 0.0}, ValueError, "tol=0.0 is invalid"),
        ({"trace_samples": 0}, ValueError, "trace_samples=0 is invalid"),
        ({"directions": 0}, ValueError, "directions=0 is invalid"),
        ({"radius": math.inf}, ValueError, "radius=inf is invalid"),
        ({"seed": 2**40}, ValueError, "seed=1099511627776 is invalid"),
        ({"batch_norm": "eval"}, ValueError, "batch_norm='eval' is invalid"),
    ],
)
def test_probe_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SharpnessProbe(**kwargs)
