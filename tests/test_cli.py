"""The lightning-tvlars command: flags, YAML round trip, a real fit."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from lightning_tvlars import TVLARS
from lightning_tvlars.examples.classifier import MNIST1DClassifier
from lightning_tvlars.examples.mnist1d import MNIST1DDataModule
from lightning_tvlars.lightning.cli import TVLARSCLI, main

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
    tvlars = config["model"]["tvlars"]
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


def test_bad_flag_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.tvlars.lr_scaling=cubic"])
    assert exit_info.value.code != 0
    assert "lr_scaling" in capsys.readouterr().err


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


@pytest.mark.parametrize("name", ["tvlars_mnist1d.yaml", "lars_cosine_mnist1d.yaml"])
def test_example_configs_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parent.parent / "configs" / name
    config = _print_config([f"--config={path}"], capsys)
    assert config["model"]["tvlars"]["phase"]["mode"] in ("fitted", "off")


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
