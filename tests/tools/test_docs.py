"""The docs cannot rot: every Python snippet runs, every command line parses, the site builds."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == language]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks of a page run in order, in one namespace, as a reader would paste them."""
    from dist_workers import free_port

    monkeypatch.chdir(tmp_path)
    # What torchrun would set, for one process: the distributed examples run as written.
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for index, code in enumerate(_blocks(page, "python")):
        try:
            exec(compile(code, f"{page.name}[python block {index}]", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.name}, python block {index} failed:\n{code}") from err


def _cli_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for page in PAGES:
        for code in _blocks(page, "bash"):
            for line in code.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part.split(">")[0])
                    if words[:1] == ["lightning-tvlars"] and words[1:2] == ["fit"]:
                        commands.append((page.name, words[1:]))
    return commands


@pytest.mark.parametrize(
    ("page", "args"),
    _cli_commands(),
    ids=[f"{page}:{' '.join(args)[:50]}" for page, args in _cli_commands()],
)
def test_documented_command_lines_parse(
    page: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_tvlars.lightning.cli import main

    monkeypatch.chdir(ROOT)
    if "--config" in args and not (ROOT / args[args.index("--config") + 1]).exists():
        pytest.skip("the config file is written by the command before it")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"] if "--print_config" not in args else args)
    assert exit_info.value.code in (0, None), f"{page}: {args}: {capsys.readouterr().err}"


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is in the docs extra")
def test_site_builds_without_warnings(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_the_api_page_has_a_section_for_every_public_name_and_no_other() -> None:
    import lightning_tvlars

    page = (ROOT / "docs" / "api.md").read_text()
    # names loaded with Lightning are documented under lightning_tvlars.lightning (mkdocstrings
    # reads the source and cannot follow the package's lazy __getattr__)
    documented = set(
        re.findall(r"^::: lightning_tvlars\.(?:lightning\.)?(\w+)$", page, flags=re.MULTILINE)
    )
    public = set(lightning_tvlars.__all__) - {"__version__"}
    assert public == documented & public, f"not on the API page: {sorted(public - documented)}"
    # every top-level reference is a public name (a removed name would linger here)
    plumbing = {"ScheduleSync", "EndProcessGroupAtExit", "distributed"}
    assert documented - public <= plumbing, sorted(documented - public - plumbing)
    assert len(public) <= 20  # about 15 names, each with one job
