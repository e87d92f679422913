"""
Packaging: the ready-made actors are `pgbus.actors`, an old ``actors.x:Y`` class path is refused
in one line naming the new one, a user's own ``actors`` package hides nothing, and ``-V`` works.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pgbus
from pgbus import ConfigError
from pgbus._config import parse_config

ROOT = Path(__file__).resolve().parent.parent
PRINTER_CONFIG = '[channels.out]\ncapacity = 1\n\n[actors.p]\nclass = "{path}"\ninbox = "out"\n'
MOVED = (
    "<string>: [actors.p] class 'actors.printer:Printer' is now "
    "'pgbus.actors.printer:Printer' (the ready-made actors moved)."
)


def test_ready_made_actors_import_as_pgbus_actors() -> None:
    """`pgbus.actors.printer:Printer` names the ready-made Printer, from the installed package."""
    from pgbus.actors.printer import Printer

    config = parse_config(PRINTER_CONFIG.format(path="pgbus.actors.printer:Printer"))
    assert config.actors[0].actor_class is Printer
    assert issubclass(Printer, pgbus.Actor)


def test_old_class_path_is_refused_naming_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no ``actors`` package is importable, the old path gets one line with the new one."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        parse_config(PRINTER_CONFIG.format(path="actors.printer:Printer"))
    assert str(info.value) == MOVED


def test_old_class_path_is_refused_in_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the repository (its top-level actors/ importable) the old path is refused as well."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as info:
        parse_config(PRINTER_CONFIG.format(path="actors.printer:Printer"))
    assert str(info.value) == MOVED


def test_own_actors_package_is_used_and_hides_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's own top-level ``actors`` package loads as theirs; pgbus.actors stays pgbus's."""
    package = tmp_path / "actors"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "printer.py").write_text("import pgbus\n\nclass Printer(pgbus.Actor):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "actors" or m.startswith("actors.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        own = parse_config(PRINTER_CONFIG.format(path="actors.printer:Printer"))
        ours = parse_config(PRINTER_CONFIG.format(path="pgbus.actors.printer:Printer"))
    finally:
        for name in [m for m in sys.modules if m == "actors" or m.startswith("actors.")]:
            del sys.modules[name]
    assert own.actors[0].actor_class.__module__ == "actors.printer"
    from pgbus.actors.printer import Printer

    assert ours.actors[0].actor_class is Printer


def test_check_with_an_old_class_path_exits_2_with_one_line(tmp_path: Path) -> None:
    """``pgbus check`` on a config naming ``actors.relay:Relay``: exit 2, one line, no traceback."""
    path = tmp_path / "bus.toml"
    path.write_text(
        '[channels.a]\ncapacity = 1\n\n[actors.r]\nclass = "actors.relay:Relay"\n'
        'inbox = "a"\noptions = { to = "a" }\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "pgbus", "check", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"pgbus: error: {path}: [actors.r] class 'actors.relay:Relay' is now "
        "'pgbus.actors.relay:Relay' (the ready-made actors moved).\n"
    )


@pytest.mark.parametrize("option", ["-V", "--version"])
def test_version_option_prints_the_version(option: str) -> None:
    """``python -m pgbus -V`` prints ``pgbus <version>`` and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "pgbus", option],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"pgbus {pgbus.__version__}\n")


def _source_files() -> set[str]:
    """Every file the package is made of, as the wheel names them (``pgbus/actors`` followed)."""
    names = set()
    for folder, _dirs, files in os.walk(ROOT / "pgbus", followlinks=True):
        for file in files:
            path = Path(folder, file)
            if path.suffix in (".py", ".typed", ".html", ".css", ".js", ".png", ".svg"):
                names.add(path.relative_to(ROOT).as_posix())
    return names


def test_built_wheel_holds_every_module(tmp_path: Path) -> None:
    """The wheel built from the sdist (as pip does) holds every file of ``pgbus/``."""
    import shutil
    import zipfile

    # A copy of the sources without what earlier builds left (build/, *.egg-info), which
    # setuptools would reuse and so hide a package missing from the configuration.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".*", "build", "dist", "*.egg-info", "__pycache__", "docs", "bench", "tests"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("pgbus-*.whl")  # built from the sdist, as pip builds one
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    expected = _source_files()
    assert "pgbus/_durable/_consumer.py" in expected
    assert "pgbus/actors/relay.py" in expected
    assert expected - in_wheel == set()
