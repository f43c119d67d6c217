"""The step benchmark: its counters (ops, host syncs, state) and its command on CPU.

The same code runs on CUDA (``lightning-tvlars bench-step --device cuda``), where it adds kernel
counts, the sync-debug check and the extra memory; here the CPU path is exercised end to end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_tvlars.bench import step
from lightning_tvlars.optim import workspace as update


def test_tvlars_step_has_no_host_sync_and_sgd_sized_state() -> None:
    (result,) = step.measure(["TVLARS"], step.parameter_shapes("tiny"), "cpu", repeats=2)
    assert result.host_syncs == 0
    assert result.state_ratio == 1.0  # one momentum buffer per parameter, as SGD
    # the counter does see syncs: lightly's LARS branches on tensor values in Python
    assert step.measure(["lightly LARS"], step.parameter_shapes("tiny"), "cpu", 1)[0].host_syncs


def test_accelerator_path_op_count_does_not_grow_with_the_number_of_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(update, "BATCHED_DEVICES", frozenset())
    shapes8, shapes32 = step.parameter_shapes("layers8"), step.parameter_shapes("layers32")
    (few,) = step.measure(["TVLARS foreach"], shapes8, "cpu", repeats=1)
    (many,) = step.measure(["TVLARS foreach"], shapes32, "cpu", repeats=1)
    assert len(shapes32) == 4 * len(shapes8) and few.ops == many.ops


def test_op_counter_counts_dispatches() -> None:
    xs = [torch.ones(3), torch.ones(4)]
    with step.OpCounter() as counter:
        torch._foreach_mul_(xs, 2.0)
        bool(xs[0].sum() > 0)
    assert counter.ops["aten._foreach_mul_"] == 1
    assert counter.host_syncs == 1


@pytest.mark.parametrize(("name", "tensors"), [("resnet50", 161), ("vit_b_16", 152), ("lm", 51)])
def test_parameter_sets_have_the_expected_sizes(name: str, tensors: int) -> None:
    assert len(step.parameter_shapes(name)) == tensors


def test_the_command_writes_the_table_and_figure_after_each_set(tmp_path: Path) -> None:
    step.main(
        [
            "--device=cpu",
            "--sets",
            "tiny",
            "layers8",
            "--optimizers",
            "SGD foreach",
            "SGD fused",
            "TVLARS",
            "TVLARS compiled",
            "--repeats=2",
            f"--out={tmp_path}",
        ]
    )
    text = (tmp_path / "step_cpu.md").read_text()
    assert "### tiny (5 tensors)" in text and "### layers8 (32 tensors)" in text
    assert "| TVLARS compiled (compile" in text and "vs SGD fused" in text
    assert (tmp_path / "step_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_reference_of_the_ratios_is_measured_when_not_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    step.main(["--device=cpu", "--sets=tiny", "--optimizers", "TVLARS", "--repeats=2"])
    table = capsys.readouterr().out
    assert "| SGD foreach | " in table and "| TVLARS | " in table


def test_processes_report_the_median_of_fresh_processes_and_their_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--device=cpu", "--sets=tiny", "--optimizers", "TVLARS", "--repeats=3"]
    step.main([*argv, "--processes=2"])
    table = capsys.readouterr().out
    assert "in each of 2 fresh processes" in table
    row = next(line for line in table.splitlines() if line.startswith("| TVLARS | "))
    median, spread = row.split(" | ")[1].split(" ", 1)
    low, high = (float(x) for x in spread.strip("()").split("-"))
    assert low <= float(median) <= high


def _combined(name: str, process_ms: tuple[float, ...]) -> step.Result:
    runs = [[step.Result(name, ms, None, None, 1.0)] for ms in process_ms]
    (result,) = step.combine(runs)
    return result


def test_ratios_pair_the_steps_of_each_process() -> None:
    """Paired, TVLARS takes half the peer's time in two of three processes (0.5, 0.5, 0.9): the
    ratio is 0.5. The medians of medians (9 and 10 ms) would say 0.9."""
    tvlars = _combined("TVLARS", (5.0, 40.0, 9.0))
    peer = _combined("timm Lars", (10.0, 80.0, 10.0))
    assert (tvlars.median_ms, peer.median_ms) == (9.0, 10.0)
    assert tvlars.ratio(peer) == pytest.approx(0.5)
    assert peer.ratio(tvlars) == pytest.approx(2.0)
    assert peer.ratio_range(tvlars) == pytest.approx((10 / 9, 2.0))
    single = step.Result("TVLARS", 3.0, None, None, 1.0)
    assert single.ratio(step.Result("SGD fused", 2.0, None, None, 1.0)) == pytest.approx(1.5)
    assert single.ratio_range(single) is None


def test_a_ratio_is_the_inverse_of_the_reverse_ratio_with_an_even_number_of_processes() -> None:
    a, b = _combined("TVLARS", (1.0, 3.0)), _combined("timm Lars", (2.0, 2.0))
    assert a.ratio(b) * b.ratio(a) == pytest.approx(1.0)
    assert a.ratio(b) == pytest.approx(0.75**0.5)  # geometric median of 0.5 and 1.5


def test_processes_combine_into_medians_of_times_and_compile_times() -> None:
    runs = [
        [step.Result("TVLARS compiled", ms, None, None, 1.0, compile_s=c)]
        for ms, c in [(3.0, 80.0), (1.0, 12.0), (2.0, 14.0)]
    ]
    (combined,) = step.combine(runs)
    assert combined.median_ms == 2.0 and combined.process_ms == (3.0, 1.0, 2.0)
    assert combined.compile_s == 14.0  # not the first (cold) process's 80 s


def test_compile_notices_are_silenced_while_compiling_and_restored_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The notices come from the process that compiles: with ``--processes`` that is a fresh
    one, so ``measure`` itself silences them, and only while it compiles."""
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch.utils.cpp_extension")]
    saved = [logger.level for logger in loggers]
    levels: list[list[int]] = []

    def fake_compile(fn: Callable[[], Any], fullgraph: bool) -> Callable[[], Any]:
        def run() -> Any:
            levels.append([logger.level for logger in loggers])
            return fn()

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        step.measure(["TVLARS compiled"], step.parameter_shapes("tiny"), "cpu", repeats=1)
        assert levels[:3] == [[logging.ERROR] * 2] * 3  # the three compiling calls
        assert levels[3:] and all(seen == [logging.WARNING] * 2 for seen in levels[3:])
        assert [logger.level for logger in loggers] == [logging.WARNING] * 2
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_table_shows_each_optimizer_against_tvlars_with_the_range(device: str) -> None:
    rows = [
        _combined("SGD foreach", (20.0, 160.0, 20.0)),
        _combined("TVLARS", (5.0, 40.0, 9.0)),
        _combined("timm Lars", (10.0, 80.0, 10.0)),
    ]
    lines = step.markdown({"tiny": rows}, device, "env").splitlines()
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("|")]
    header, body = table[0], {row[0]: row for row in table[2:]}
    assert len(header) == (10 if device == "cuda" else 8)
    assert all(len(row) == len(header) for row in table)
    column = header.index("vs TVLARS")
    assert body["timm Lars"][column] == "2.00x (1.11-2.00)"
    assert body["SGD foreach"][column] == "4.00x (2.22-4.00)"
    assert body["TVLARS"][column] == ""
    assert body["timm Lars"][header.index("vs SGD fused")] == "n/a"  # not measured


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats=0"], "argument --repeats: 0 is invalid: expected an integer >= 1"),
        (["--processes=-3"], "argument --processes: -3 is invalid: expected an integer >= 1"),
        (["--threads=x"], "argument --threads: x is invalid: expected an integer >= 1"),
        (
            ["--device=tpu"],
            "argument --device: tpu is invalid: expected a torch device such as cpu, cuda or "
            "cuda:1",
        ),
    ],
)
def test_bad_arguments_are_refused_naming_the_flag_and_what_is_allowed(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        step.main(["--sets=tiny", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"lightning-tvlars bench-step: error: {message}\n"


def test_captured_steps_are_refused_off_cuda_and_labelled_with_their_capture_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        step.main(["--device=cpu", "--sets=tiny", "--optimizers", "TVLARS graph", "LAMB"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("error: TVLARS graph capture a CUDA graph: they need --device cuda")
    )
    row = step.Result("TVLARS graph", 0.5, 0, 0, 1.0, kernels=30, compile_s=0.25)
    base = step.Result("SGD foreach", 1.0, 6, 0, 1.0, kernels=4)
    text = step.markdown({"tiny": [base, row]}, "cuda", "env")
    assert "| TVLARS graph (capture 0.25 s) | 0.500 |" in text


def test_optimizers_whose_package_is_missing_are_refused_before_measuring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name)
    )
    with pytest.raises(SystemExit) as exit_info:
        step.main(["--sets=tiny", "--optimizers", "TVLARS", "timm Lars", "timm Lamb"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.endswith(
        "error: timm Lars, timm Lamb need timm: pip install 'lightning-tvlars[bench]', "
        "or choose others with --optimizers"
    )
