"""``lightning-tvlars plot``: logs of real runs (CSV and TensorBoard) drawn to a PNG."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_helpers import TinyRegressor

from lightning_tvlars import PhaseConfig, TVLARSConfig, TVLARSMonitor
from lightning_tvlars.cli import plot
from lightning_tvlars.cli.plot import find_logs, load_metrics, plot_metrics, plot_run
from lightning_tvlars.lightning import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 6
LAYERS = ["net.0.weight", "net.3.weight"]  # the adapted tensors of TinyRegressor, model order


def _fit(loggers: list[pl.loggers.Logger], lr: float) -> TinyRegressor:
    torch.manual_seed(0)
    phase = PhaseConfig(mode="explicit", decay=0.5, delay=2)
    model = TinyRegressor(tvlars=TVLARSConfig(lr=lr, phase=phase))
    pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        log_every_n_steps=1,
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TVLARSMonitor()],
    ).fit(model)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Run 1 logs to CSV and TensorBoard at once; run 2, later, to CSV only (csv/version_1)."""
    root = tmp_path_factory.mktemp("runs")
    csv_logger, tb_logger = CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")
    model = _fit([csv_logger, tb_logger], lr=1.0)
    tb_logger.experiment.flush()
    newer = CSVLogger(root, name="csv")
    _fit([newer], lr=3.0)
    return {
        "root": root,
        "csv": Path(csv_logger.log_dir),
        "tb": Path(tb_logger.log_dir),
        "newer": Path(newer.log_dir),
        "phase": model.tvlars_plan.phase,
    }


def _column(path: Path, name: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f) if r[name]]


def _check_png(path: Path, dpi: int, figsize_inches: tuple[float, float]) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == (round(figsize_inches[0] * dpi), round(figsize_inches[1] * dpi))


# ---------------------------------------------------------------- reading logs


def test_load_metrics_reads_the_csv_file_exactly(runs: dict) -> None:
    metrics = load_metrics(runs["csv"])
    phase = metrics["tvlars/phase"]
    assert [s for s, _ in phase] == list(range(STEPS))  # Lightning's logging step = t
    assert phase == _column(runs["csv"] / "metrics.csv", "tvlars/phase")
    for step, value in phase:
        assert value == pytest.approx(runs["phase"](step))
    assert [n for n in metrics if n.startswith("tvlars/trust_ratio/")] == [
        f"tvlars/trust_ratio/{n}" for n in LAYERS
    ]
    assert metrics["train/loss"][0][0] == 0  # other metrics too, with their own (sparse) steps
    assert load_metrics(runs["csv"] / "metrics.csv") == metrics  # the file itself


def test_load_metrics_reads_tensorboard_like_the_csv(runs: dict) -> None:
    tb, from_csv = load_metrics(runs["tb"]), load_metrics(runs["csv"])
    assert {n for n in tb if n.startswith("tvlars")} == {n for n in from_csv if "tvlars" in n}
    for name in ("tvlars/phase", "tvlars/lr", f"tvlars/trust_ratio/{LAYERS[1]}"):
        assert [s for s, _ in tb[name]] == [s for s, _ in from_csv[name]]
        assert [v for _, v in tb[name]] == pytest.approx([v for _, v in from_csv[name]], rel=1e-6)
    # TensorBoard keeps the order in which the monitor logged: the model's.
    assert list(plot.per_layer(tb, "tvlars", "trust_ratio")) == LAYERS
    (events,) = runs["tb"].glob("events.out.tfevents.*")
    assert load_metrics(events) == tb


def test_sparse_rows_bad_cells_and_repeated_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,tvlars/phase,tvlars/trust_ratio/net.10.w,tvlars/trust_ratio/net.2.w\n"
        "0,3,,,\n"
        ",1,0.5,inf,2\n"
        ",,0.9,,\n"  # no step: skipped
        "0,2,oops,,\n"  # non-numeric: skipped
        ",1,0.25,,\n"  # step 1 again (a resumed run): the last value wins
    )
    metrics = load_metrics(tmp_path)
    assert metrics["tvlars/phase"] == [(1, 0.25)]
    assert metrics["epoch"] == [(2, 0.0), (3, 0.0)]
    # CSVLogger sorts its header alphabetically; layers come back in natural order.
    assert list(plot.per_layer(metrics, "tvlars", "trust_ratio")) == ["net.2.w", "net.10.w"]
    assert metrics["tvlars/trust_ratio/net.10.w"] == [(1, float("inf"))]


def test_tensorboard_missing_is_a_clear_import_error(
    runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    with pytest.raises(ImportError, match=r"needs the tensorboard package \(pip install"):
        load_metrics(runs["tb"])


# ---------------------------------------------------------------- finding logs


def test_parent_directory_picks_the_newest_run(runs: dict) -> None:
    assert [p.parent.name for p in find_logs(runs["root"] / "csv")] == ["version_0", "version_1"]
    assert find_logs(runs["root"])[-1] == runs["newer"] / "metrics.csv"  # csv/, tb/ below
    newest = load_metrics(runs["root"] / "csv")
    assert newest == load_metrics(runs["newer"])
    assert newest["tvlars/lr"][0][1] == pytest.approx(3.0 * 16 / 256)  # run 2's learning rate


def test_a_run_that_logged_no_metrics_is_named_with_the_likely_reason(tmp_path: Path) -> None:
    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "hparams.yaml").write_text("{}\n")  # what CSVLogger leaves when nothing was logged
    with pytest.raises(ValueError) as info:
        find_logs(tmp_path)
    assert str(info.value).endswith(
        f"({run} is a Lightning run that logged no metrics: a run shorter than the trainer's "
        "log_every_n_steps logs none)"
    )


def test_no_log_or_no_tvlars_metric_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_logs(tmp_path / "missing")
    with pytest.raises(ValueError, match=rf"{tmp_path}: no metrics.csv or TensorBoard"):
        plot_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,tvlars_1/phase\n0,1,0.5,0.9\n")
    message = (
        rf"{tmp_path / 'metrics.csv'}: no TVLARS metrics named 'tvlars/...' \(expected those of "
        r"TVLARSMonitor.*found: train, tvlars_1; did you mean --prefix tvlars_1\?"
    )
    with pytest.raises(ValueError, match=message):
        plot_run(tmp_path)
    assert not (tmp_path / "tvlars.png").exists()


# ---------------------------------------------------------------- drawing


@pytest.mark.parametrize("kind", ["csv", "tb"])
def test_plot_run_writes_a_png_for_each_logger(runs: dict, kind: str) -> None:
    path = plot_run(runs[kind], dpi=40)
    assert path == runs[kind] / "tvlars.png"
    figure = plot_metrics(load_metrics(runs[kind]))
    _check_png(path, 40, tuple(figure.get_size_inches()))
    assert figure.get_size_inches()[0] == plot.FIGURE_WIDTH


def _heatmap_rows(figure: object) -> list[str]:
    (ax,) = [a for a in figure.axes if a.get_title().startswith("log10")]  # type: ignore[attr-defined]
    return [t.get_text() for t in ax.get_yticklabels()]


def test_layers_regex_and_metric_select_the_per_layer_panels(runs: dict) -> None:
    metrics = load_metrics(runs["tb"])
    assert _heatmap_rows(plot_metrics(metrics)) == LAYERS
    figure = plot_metrics(metrics, layers=r"net\.3")
    assert _heatmap_rows(figure) == ["net.3.weight"]
    (curves,) = [a for a in figure.axes if a.get_title().startswith("per-layer")]
    assert [line.get_label() for line in curves.get_lines()] == ["net.3.weight"]
    with pytest.raises(ValueError, match=r"--layers 'conv' matches none of the 2 layers"):
        plot_metrics(metrics, layers="conv")
    # Any <prefix>/<family>/<layer> family: LNR is logged for every tensor, adapted or not.
    assert _heatmap_rows(plot_metrics(metrics, metric="lnr", layers="bias")) == [
        "net.0.bias",
        "net.1.bias",
        "net.3.bias",
    ]
    with pytest.raises(ValueError, match=r"families in this log: grad_norm, lnr, trust_ratio"):
        plot_metrics(metrics, metric="lrn")


def test_many_layers_are_subsampled_and_optional_panels_drawn() -> None:
    names = [f"block.{i}.weight" for i in range(12)]
    metrics = {
        f"tvlars/trust_ratio/{n}": [(s, 1e-3 * (i + 1)) for s in (1, 2, 4)]
        for i, n in enumerate(names)
    }
    metrics |= {"tvlars/sharpness/trace": [(2, 5.0)], "val/acc": [(4, 0.5)], "train/loss": [(1, 2)]}
    figure = plot_metrics(metrics, max_layers=5)
    assert _heatmap_rows(figure) == [names[i] for i in (0, 3, 6, 8, 11)]  # evenly, ends kept
    titles = [a.get_title() for a in figure.axes]
    assert "training metrics" in titles and any(t.startswith("sharpness") for t in titles)
    (curves,) = [a for a in figure.axes if a.get_title().startswith("per-layer")]
    assert curves.get_legend() is None and len(curves.get_lines()) == 12  # colour by depth
    assert any("no tvlars/phase" in t.get_text() for a in figure.axes for t in a.texts)


# ---------------------------------------------------------------- command line


def test_cli_entry_point_draws_and_prints_the_png(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(["plot", str(runs["root"] / "csv"), "--out", str(tmp_path / "a.png"), "--dpi", "30"])
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "a.png")
    assert "2 runs found; drawing the newest" in captured.err and "version_1" in captured.err
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cli_passes_every_option_to_plot_run(
    runs: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(plot, "plot_run", lambda *a, **k: calls.append((a, k)) or Path("x.png"))
    argv = ["--prefix", "tvlars_1", "--layers", r"net\.0", "--max-layers", "3", "--dpi", "30"]
    cli.main(["plot", str(runs["tb"]), "--out", "o.png", "--metric", "lnr", *argv])
    ((args, kwargs),) = calls
    assert args == (runs["tb"], Path("o.png"), "tvlars_1")
    assert kwargs["layers"].pattern == r"net\.0"
    assert (kwargs["max_layers"], kwargs["metric"], kwargs["dpi"]) == (3, "lnr", 30)
    assert capsys.readouterr().out.strip() == "x.png"


def test_cli_errors_exit_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"lightning-tvlars plot: error: {tmp_path}: no metrics.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["plot", str(tmp_path), "--layers", "("])
    assert "is not a regular expression" in capsys.readouterr().err
    # a bad value is one line naming the flag, the value and what is allowed (no usage lines)
    for flag, value in (("--max-layers", "0"), ("--dpi", "x")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["plot", str(tmp_path), flag, value])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            f"lightning-tvlars plot: error: argument {flag}: {value} is invalid: "
            "expected an integer >= 1\n"
        )
