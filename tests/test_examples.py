"""The runnable examples run and learn."""

from __future__ import annotations

import pytest

from lightning_tvlars.examples import plain_pytorch


def test_plain_pytorch_example_learns(capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = plain_pytorch.main(steps=60, batch_size=1024)
    assert accuracy > 0.9
    out = capsys.readouterr().out
    assert "phi" in out and "training accuracy" in out
