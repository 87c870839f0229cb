"""The distribution installs one import name, ``trackbridge``, and works from its wheel.

PyPI has distributions called ``exporters`` and ``importers``; pip lets two
distributions write one folder of site-packages, so any top-level name but our own
would overwrite theirs (or be overwritten). The repository keeps the design card's
folders, which setuptools maps into the one package: these tests read the wheel that
``python -m build`` makes, not the source tree.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "bridge": "trackbridge",
    "exporters": "trackbridge/exporters",
    "importers": "trackbridge/importers",
}
FOLDERS["trackers"] = "trackbridge/trackers"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # built from a copy: a build writes build/ and egg-info beside the sources
    src = tmp_path_factory.mktemp("src") / "trackbridge"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "mlruns", "__pycache__")
    )
    # --no-isolation: the build backend installed with the dev tools, no download
    p = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (whl,) = out.glob("trackbridge-*.whl")
    return whl


def test_the_wheel_installs_only_trackbridge(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"trackbridge"}, top


def test_every_source_file_is_in_the_wheel(wheel: Path) -> None:
    """A folder missing from pyproject's package list would vanish from installs only."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, installed in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).as_posix()
            assert f"{installed}/{rel}" in names, f"{folder}/{rel} is not in the wheel"


def test_the_wheel_declares_every_tracker(wheel: Path) -> None:
    z = zipfile.ZipFile(wheel)
    (ep,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = z.read(ep).decode()
    assert "[trackbridge.trackers]" in text
    for name in ("mlflow", "wandb", "neptune", "bundle", "spool"):
        assert f"\n{name} = trackbridge.trackers." in text
    assert "trackbridge = trackbridge.cli:main" in text


def test_the_installed_wheel_runs_the_quickstart(wheel: Path, tmp_path: Path) -> None:
    """The wheel alone, in a new virtualenv, runs the main job. The trackers' SDKs are
    taken from this interpreter's site-packages (installing them again would download
    gigabytes); trackbridge itself comes only from the wheel."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # this interpreter's site-packages, also when it is itself a virtualenv (whose
    # packages "system site packages" would miss); listed as plain paths, so that its
    # .pth files (the editable install of trackbridge) are not run
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "this-interpreter.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": str(tmp_path / "home")}
    where = subprocess.run(
        [str(py), "-c", "import trackbridge, sys; print(trackbridge.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(env_dir)), where  # not the source tree's editable install
    for name in ("bridge", "exporters", "importers"):
        p = subprocess.run([str(py), "-c", f"import {name}"], cwd=tmp_path, env=env, capture_output=True)
        assert p.returncode != 0, f"{name} is importable"
    p = subprocess.run(
        [str(env_dir / "bin" / "trackbridge"), "quickstart", "--dir", str(tmp_path / "qs")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "verify: identical" in p.stdout
