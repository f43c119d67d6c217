"""The lightning-tvlars command: flags, help, YAML round trip, errors, model choice, a real fit."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_tvlars import TVLARS
from lightning_tvlars.cli.fit import TVLARSCLI, fit_main
from lightning_tvlars.cli.main import EXTRA_COMMANDS, main
from lightning_tvlars.examples.barlow_twins import BarlowTwins1D
from lightning_tvlars.examples.classifier import MNIST1DClassifier
from lightning_tvlars.examples.mnist1d import MNIST1DDataModule

SMALL = ["--data.num_samples=4000", "--data.val_size=400", "--model.width=16", "--model.blocks=1"]


def _print_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_tvlars_option_is_a_flag_and_yaml_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _print_config(
        [
            "--model.tvlars.lr=0.7",
            "--model.tvlars.lr_scaling=sqrt",
            "--model.tvlars.phase.mode=explicit",
            "--model.tvlars.phase.decay=0.01",
            "--model.tvlars.phase.delay=2",
            "--model.tvlars.phase.delay_unit=epochs",
            "--model.tvlars.norm_clip=10",
            "--monitor.per_layer=false",
        ],
        capsys,
    )
    assert config["model"]["class_path"].endswith(".MNIST1DClassifier")  # the default model
    tvlars = config["model"]["init_args"]["tvlars"]
    assert tvlars["lr"] == 0.7 and tvlars["lr_scaling"] == "sqrt"
    assert tvlars["phase"]["delay"] == 2 and tvlars["phase"]["delay_unit"] == "epochs"
    assert set(tvlars) >= {
        "momentum",
        "weight_decay",
        "trust_coefficient",
        "base_batch_size",
        "lr_schedule",
        "select",
        "overrides",
    }
    assert set(tvlars["phase"]) >= {"mode", "half_at", "decayed_by_end", "alpha", "floor"}
    assert config["monitor"]["per_layer"] is False
    assert "optimizer" not in config  # no LightningCLI --optimizer: groups are never rebuilt
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert _print_config([f"--config={path}"], capsys) == config


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            "--model.tvlars.lr_scaling=cubic",
            "--model.tvlars.lr_scaling=cubic is invalid: expected one of 'linear', 'sqrt', 'none'",
        ),
        ("--model.tvlars.lr=abc", "--model.tvlars.lr=abc is invalid: expected a number"),
        ("--model.tvlars.lr=-1", "--model.tvlars.lr=-1.0 is invalid: expected a finite number > 0"),
        (
            "--model.tvlars.phase.half_at=1.5",
            "--model.tvlars.phase.half_at=1.5 is invalid: expected a number in [0, 1)",
        ),
        (
            "--model.tvlars.phase.decay=0.1",
            "--model.tvlars.phase.decay=0.1 has no effect with phase.mode='fitted': remove it "
            "or change that choice",
        ),
        (
            '--model.tvlars.overrides=[{"match": "head.*", "lr_scale": -2}]',
            "--model.tvlars.overrides[0].lr_scale=-2.0 is invalid: expected a finite number > 0",
        ),
        (
            '--model.tvlars.overrides=[{"match": "heda.*", "lr_scale": 0.5}]',
            "--model.tvlars: override match pattern 'heda.*' matches no trainable parameter; "
            "names look like ['encoder.0.weight', 'encoder.1.weight', 'encoder.1.bias']",
        ),
        (
            "--trainer.max_epochs=x",
            "--trainer.max_epochs=x is invalid: expected an integer or null",
        ),
        (
            "--model=Nope",
            "--model=Nope is invalid: expected one of MNIST1DClassifier, BarlowTwins1D, GAN1D or "
            "the import path of a LightningModule",
        ),
        (
            "--model=nope.Model",
            "--model=nope.Model is invalid: cannot import it (No module named 'nope')",
        ),
        (
            "--model=torch.nn.Linear",
            "--model=torch.nn.Linear is invalid: expected the import path of a LightningModule "
            "subclass",
        ),
        # values that only the classes' own checks catch, while the run is being built
        ("--data.batch_size=0", "--data.batch_size=0 is invalid: expected an int > 0"),
        (
            "--data.num_samples=10",
            "--data.val_size=5000 is invalid: expected 0 < val_size < 80% of num_samples=10",
        ),
        ("--model.width=0", "--model.width=0 is invalid: expected an int > 0"),
        (
            "--monitor.name_filter=[",
            "--monitor.name_filter='[' is invalid: expected a regular expression "
            "(unterminated character set at position 0)",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_the_value_and_what_is_allowed(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fit_main(["fit", flag])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"lightning-tvlars fit: error: {message}\n"


def test_cli_fit_trains_with_tvlars_and_the_monitor(tmp_path: Path) -> None:
    cli = TVLARSCLI(
        MNIST1DClassifier,
        MNIST1DDataModule,
        args=[
            "fit",
            *SMALL,
            "--data.batch_size=128",
            "--trainer.max_epochs=3",
            "--trainer.log_every_n_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--model.tvlars.lr=8.0",
        ],
    )
    assert isinstance(cli.trainer.optimizers[0], TVLARS)
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(8.0 * 128 / 256)
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("tvlars/phase")]
    assert logged and any(k.startswith("tvlars/trust_ratio/encoder.0.weight") for k in rows[0])
    accuracy = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert accuracy[-1] > 0.3  # 10 classes: well above chance after 3 short epochs


@pytest.mark.parametrize(
    "name",
    [
        "tvlars_mnist1d.yaml",
        "lars_cosine_mnist1d.yaml",
        "lamb_warmup_cosine_mnist1d.yaml",
        "barlow_twins_mnist1d.yaml",
    ],
)
def test_example_configs_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parents[2] / "configs" / name
    config = _print_config([f"--config={path}"], capsys)
    assert config["model"]["init_args"]["tvlars"]["phase"]["mode"] in ("fitted", "off")


def test_a_users_module_gets_the_flags_from_a_plain_lightning_cli(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI
    from lightning_helpers import TinyRegressor

    cli = LightningCLI(
        TinyRegressor,
        args=[
            "--model.tvlars.lr=0.5",
            "--model.tvlars.lr_scaling=sqrt",
            "--model.batch_size=64",
            "--trainer.max_steps=2",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    assert cli.model.tvlars_config.lr == 0.5 and cli.model.tvlars_config.lr_scaling == "sqrt"
    cli.trainer.fit(cli.model)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, TVLARS) and optimizer.step_count == 2
    assert len(optimizer.param_groups) == 2  # the mixin's groups, not model.parameters()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (64 / 256) ** 0.5)


def test_fit_help_shows_every_tvlars_field_with_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    for flag, words in {
        "--model.tvlars.lr LR": "base learning rate at ``base_batch_size``",
        "--model.tvlars.momentum MOMENTUM": "LARS: heavy-ball momentum in [0, 1)",
        "--model.tvlars.optimizer {lars,lamb}": "``lars`` (:class:`~lightning_tvlars.TVLARS`)",
        "--model.tvlars.max_grad_norm MAX_GRAD_NORM": "LAMB: clip all gradients together",
        "--model.tvlars.warmup_fraction WARMUP_FRACTION": "a linear warm-up of the learning rate",
        "--model.tvlars.total_steps TOTAL_STEPS": "the run's length in optimizer steps",
        "--model.tvlars.trust_coefficient TRUST_COEFFICIENT": "``eta`` > 0 of the trust ratio",
        "--model.tvlars.phase.decay DECAY": "explicit: the steepness",
        "--monitor.prog_bar {true,false}": "progress bar",
    }.items():
        assert flag in out and words in out, flag
    # a list: recent jsonargparse releases show its items as [ITEM,...], older ones its name
    assert re.search(r"--model\.tvlars\.overrides (\[ITEM,\.\.\.\]|OVERRIDES),", out)
    assert "per-selector ``lr_scale``" in out
    assert "--model chooses another: BarlowTwins1D, GAN1D" in out


def test_print_config_prints_the_whole_tvlars_block(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import fields

    from lightning_tvlars import PhaseConfig, TVLARSConfig

    tvlars = _print_config([], capsys)["model"]["init_args"]["tvlars"]
    assert list(tvlars) == [f.name for f in fields(TVLARSConfig)]
    assert list(tvlars["phase"]) == [f.name for f in fields(PhaseConfig)]
    assert tvlars["norm_clip"] is None and tvlars["overrides"] == []


@pytest.mark.parametrize("args", [["--help"], []])
def test_top_level_help_lists_every_command(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "fit" in out and "BarlowTwins1D" in out
    for command in ("bench", "compare", "bench-step", "bench-monitor", "plot"):
        assert f"\n  {command} " in out, command
    assert set(EXTRA_COMMANDS) == {"bench", "compare", "bench-step", "bench-monitor", "plot"}


def test_an_unknown_command_is_one_line_naming_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["comapre", "--help"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "lightning-tvlars: error: 'comapre' is not a command: expected one of fit, validate, "
        "test, predict, bench, compare, bench-step, bench-monitor, plot (see lightning-tvlars "
        "--help)\n"
    )


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_tvlars import __version__

    main([flag])
    assert capsys.readouterr().out == f"lightning-tvlars {__version__}\n"


def test_model_choice_trains_barlow_twins_with_yaml_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "barlow.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "BarlowTwins1D",
                    "init_args": {
                        "width": 8,
                        "projection_dim": 32,
                        "tvlars": {
                            "overrides": [
                                {"match": ["projection_head.*"], "lr_scale": 0.5},
                                {"match": "projection_head.layers.6.*", "adapt": False},
                            ]
                        },
                    },
                }
            }
        )
    )
    cli = fit_main(
        [
            "fit",
            f"--config={config}",
            "--data.num_samples=2000",
            "--data.val_size=200",
            "--data.batch_size=128",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=CSVLogger",
            "--trainer.logger.save_dir=.",
        ]
    )
    assert isinstance(cli.model, BarlowTwins1D)
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, TVLARS) and optimizer.step_count == 2
    by_name = {n: g for g in optimizer.param_groups for n in g["param_names"]}
    assert by_name["projection_head.layers.0.weight"]["lr_scale"] == 0.5
    assert by_name["projection_head.layers.0.weight"]["adapt"] is True
    assert by_name["projection_head.layers.6.weight"]["adapt"] is False
    assert "lr_scale" not in by_name["encoder.0.weight"]
    base = 128 / 256
    assert by_name["encoder.0.weight"]["lr"] == pytest.approx(base)
    assert by_name["projection_head.layers.0.weight"]["lr"] == pytest.approx(0.5 * base)
    out = capsys.readouterr().out.splitlines()
    assert out[-4:] == [
        "Logs (CSV): lightning_logs/version_0",
        "Checkpoints: lightning_logs/version_0/checkpoints (best: epoch=0-step=2.ckpt)",
        "Look at the run:",
        "  lightning-tvlars plot lightning_logs/version_0",
    ]


def test_the_old_import_path_still_works() -> None:
    from lightning_tvlars.lightning import cli

    assert cli.TVLARSCLI is TVLARSCLI and cli.main is main


def test_first_run_is_quiet_and_ends_with_where_the_results_are(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def lightning_tvlars(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lightning_tvlars.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    run = lightning_tvlars(
        "fit",
        "--data.num_samples=2000",
        "--data.val_size=200",
        "--data.batch_size=256",
        "--model.width=8",
        "--model.blocks=1",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    for noise in ("💡 Tip", "LeafSpec", "tensorboardX"):
        assert noise not in output, noise
    assert run.stdout.strip().splitlines()[-4:] == [
        "Checkpoints: lightning_logs/version_0/checkpoints (best: epoch=0-step=4.ckpt)",
        "Look at the run:",
        "  lightning-tvlars plot lightning_logs/version_0",
        "  tensorboard --logdir lightning_logs",
    ]
    plot = lightning_tvlars("plot", "lightning_logs/version_0", "--dpi", "40")
    assert plot.returncode == 0, plot.stderr[-3000:]
    png = tmp_path / plot.stdout.strip()
    assert png.name == "tvlars.png" and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_fit_under_ddp_spawn_on_two_cpu_processes_exits_cleanly(tmp_path: Path) -> None:
    """ddp_spawn pickles the CLI (its parser's formatter class included) into each process, and
    each process must leave its gloo process group before it exits (see docs/faq.md)."""
    from dist_workers import launcher_env

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_tvlars.cli",
            "fit",
            "--trainer.strategy=ddp_spawn",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--data.num_samples=2000",
            "--data.val_size=200",
            "--data.batch_size=64",
            "--model.width=8",
            "--model.blocks=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1",
        ],
        cwd=tmp_path,
        env=launcher_env(PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "64 per device x 2 data-parallel replica(s)" in run.stderr  # really 2 processes
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in run.stderr
    # The closing summary comes from the process that trained (rank 0), not from the launching
    # one, whose logger would pick the next free version and whose monitor saw no step.
    written = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert written == ["version_0"]
    assert "Logs (TensorBoard): lightning_logs/version_0" in run.stdout, run.stdout
    assert "lightning-tvlars plot lightning_logs/version_0" in run.stdout
    assert "No TVLARS metrics" not in run.stdout
    assert run.stdout.count("Logs (TensorBoard)") == 1  # one summary, from rank 0 only


def test_a_fast_dev_run_names_no_checkpoint_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """fast_dev_run writes no checkpoint: the closing summary must not point to one."""
    monkeypatch.chdir(tmp_path)
    fit_main(
        [
            "fit",
            *SMALL,
            "--trainer.fast_dev_run=true",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert "Checkpoints:" not in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_summary_starts_with_the_last_validation_metrics() -> None:
    from types import SimpleNamespace

    import torch

    from lightning_tvlars.cli.fit import run_summary

    metrics = {"val/loss": 0.05, "val/acc": 0.98761, "train/loss": 1.0, "val/per_class": [1, 2]}
    trainer = SimpleNamespace(
        callback_metrics={k: torch.tensor(v) for k, v in metrics.items()},
        loggers=[],
        checkpoint_callback=None,
        callbacks=[],
        log_every_n_steps=50,
    )
    assert run_summary(trainer).splitlines()[0] == "Last validation: val/acc 0.9876, val/loss 0.05"
    trainer.callback_metrics = {"train/loss": torch.tensor(1.0)}  # no validation ran
    assert "Last validation" not in run_summary(trainer)


# ---------------------------------------------------------------------- a user's own LightningCLI

#: A user's script: their module (with the mixin) and data, and a plain LightningCLI with the one
#: line that gives one-line errors (the negative control runs it without that argument).
USER_SCRIPT = """
import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_tvlars import TVLARSConfig, TVLARSMixin
from lightning_tvlars.cli import TVLARSParser


class MyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 16):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} is invalid: expected an int > 0")
        self.batch_size = batch_size

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size)


class MyModel(TVLARSMixin, pl.LightningModule):
    def __init__(self, hidden: int = 8, SIGNATURE):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)


if __name__ == "__main__":
    LightningCLI(MyModel, MyData, parser_class=TVLARSParser)
"""

#: Runs each (script, args) as ``python script args`` would, in one process (one start-up for
#: all): exit code, stdout, stderr (an uncaught exception: its traceback, code 1).
DRIVER = """
import contextlib, io, json, runpy, sys, traceback

runs, results_path, results = sys.argv[1], sys.argv[2], []
for script, args in json.load(open(runs)):
    sys.argv = [script, *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
json.dump(results, open(results_path, "w"))
"""

#: The signatures the docs use: a default instance (or a module-level one, the same to
#: jsonargparse) and the mixin's ``| None = None``.
SIGNATURES = {
    "default": "tvlars: TVLARSConfig = TVLARSConfig()",
    "optional": "tvlars: TVLARSConfig | None = None",
}
USER_ERRORS = {
    "--model.tvlars.lr=-1": "--model.tvlars.lr=-1.0 is invalid: expected a finite number > 0",
    "--model.tvlars.phase.mode=fited": "--model.tvlars.phase.mode=fited is invalid: expected "
    "one of 'fitted', 'explicit', 'off'",
    "--model.tvlars.phase.decay=0.1": "--model.tvlars.phase.decay=0.1 has no effect with "
    "phase.mode='fitted': remove it or change that choice",
    "--model.tvlars.optimizer=adam": "--model.tvlars.optimizer=adam is invalid: expected one of "
    "'lars', 'lamb'",
    "--model.tvlars.betas=[0.8,0.9]": "--model.tvlars.betas=(0.8, 0.9) has no effect with "
    "optimizer='lars': remove it or change that choice",
    "--model.tvlars.total_steps=1.5": "--model.tvlars.total_steps=1.5 is invalid: expected an "
    "integer or null",
    "--data.batch_size=0": "--data.batch_size=0 is invalid: expected an int > 0",
}
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def user_cli(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """Every run of the user's script, by (signature or "without", case), from one process."""
    folder = tmp_path_factory.mktemp("user_cli")
    runs: dict[tuple[str, str], tuple[str, list[str]]] = {}
    for name, signature in SIGNATURES.items():
        script = folder / f"train_{name}.py"
        script.write_text(USER_SCRIPT.replace("SIGNATURE", signature))
        runs[name, "help"] = (str(script), ["fit", "--help"])
        runs[name, "lr 2"] = (str(script), ["fit", "--model.tvlars.lr", "2", "--print_config"])
        for flag in USER_ERRORS:
            runs[name, flag] = (str(script), ["fit", flag, *QUIET])
        root = f"--trainer.default_root_dir={folder / name}"
        runs[name, "fit"] = (str(script), ["fit", "--trainer.max_steps=2", root, *QUIET])
    plain = folder / "train_without.py"  # the same script without the one line
    plain.write_text(
        USER_SCRIPT.replace("SIGNATURE", SIGNATURES["default"]).replace(
            ", parser_class=TVLARSParser", ""
        )
    )
    runs["without", "lr -1"] = (str(plain), ["fit", "--model.tvlars.lr=-1", *QUIET])
    (folder / "runs.json").write_text(json.dumps(list(runs.values())))
    (folder / "driver.py").write_text(DRIVER)
    run = subprocess.run(
        [sys.executable, "driver.py", "runs.json", "results.json"],
        cwd=folder,
        # the same lightning_tvlars as this test imported
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(runs, json.loads((folder / "results.json").read_text()), strict=True))


@pytest.mark.parametrize("signature", SIGNATURES)
@pytest.mark.parametrize("flag", USER_ERRORS)
def test_a_users_lightning_cli_with_tvlars_parser_reports_a_bad_value_in_one_line(
    user_cli: dict[tuple[str, str], dict], signature: str, flag: str
) -> None:
    result = user_cli[signature, flag]
    assert result["code"] == 2, result["err"][-3000:]
    lines = result["err"].strip().splitlines()
    assert lines[-1] == f"train_{signature}.py fit: error: {USER_ERRORS[flag]}"
    if not flag.startswith("--data"):  # checked after parsing: nothing else was printed
        assert len(lines) == 1, lines
    assert "Traceback" not in result["err"]


@pytest.mark.parametrize("signature", SIGNATURES)
def test_a_users_lightning_cli_with_tvlars_parser_shows_and_parses_every_field(
    user_cli: dict[tuple[str, str], dict], signature: str
) -> None:
    help_text = user_cli[signature, "help"]
    assert help_text["code"] == 0, help_text["err"][-3000:]
    out = " ".join(help_text["out"].split())
    for flag in ("--model.tvlars.lr LR", "--model.tvlars.optimizer {lars,lamb}"):
        assert flag in out, flag
    assert "--model.tvlars.phase.mode {fitted,explicit,off}" in out
    assert "base learning rate at ``base_batch_size``" in out
    printed = user_cli[signature, "lr 2"]
    assert printed["code"] == 0, printed["err"][-3000:]
    tvlars = yaml.safe_load(printed["out"])["model"]["tvlars"]
    assert tvlars["lr"] == 2.0 and tvlars["phase"]["mode"] == "fitted"
    fit = user_cli[signature, "fit"]
    assert fit["code"] == 0, fit["err"][-3000:]


def test_a_users_lightning_cli_without_tvlars_parser_prints_a_traceback(
    user_cli: dict[tuple[str, str], dict],
) -> None:
    """The negative control: the same script without ``parser_class=TVLARSParser``."""
    result = user_cli["without", "lr -1"]
    assert result["code"] == 1
    assert "Traceback (most recent call last)" in result["err"]
    lines = result["err"].strip().splitlines()
    assert len(lines) > 10
    assert lines[-1] == "ValueError: lr=-1.0 is invalid: expected a finite number > 0"
