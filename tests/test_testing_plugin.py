"""
``pgbus.testing`` as a pytest plugin: a user's test module outside ``tests/`` gets ``pgbus_dsn``
and ``pgbus_bus`` through the ``pytest11`` entry point, in a pytest run of its own.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pytest_plugin"


async def run_pytest(directory: Path, *args: str) -> tuple[int, str]:
    """``python -m pytest`` in *directory*, as a user's project would run it."""
    with trio.fail_after(180):
        result = await trio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=directory,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
        )
    return result.returncode, (result.stdout + result.stderr).decode()


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    """Installing pgbus registers pgbus.testing under the name "pgbus"."""
    points = importlib.metadata.entry_points(group="pytest11")
    assert [(p.name, p.value) for p in points if p.name == "pgbus"] == [("pgbus", "pgbus.testing")]


async def test_a_users_test_module_gets_the_fixtures(tmp_path: Path) -> None:
    """The README's example test passes as it is, in a directory that knows nothing of pgbus."""
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project)
    status, output = await run_pytest(project)
    assert status == 0, output
    assert "3 passed" in output


async def test_without_the_plugin_the_fixtures_are_missing(tmp_path: Path) -> None:
    """``-p no:pgbus`` turns the entry point off: so the fixtures did come from it."""
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project)
    status, output = await run_pytest(project, "-p", "no:pgbus")
    assert status == 1, output
    assert "fixture 'pgbus_bus' not found" in output
    assert "fixture 'pgbus_dsn' not found" in output
