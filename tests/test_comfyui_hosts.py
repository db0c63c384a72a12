"""Runs the host tests (tests/host/host_*.py) once per ComfyUI checkout, each in its own process.

ComfyUI's modules are process-global, so every checkout gets a fresh interpreter. Checkouts are found
in COMFYUI_PATH (':'-separated), $HOME/ComfyUI and $HOME/comfy-hosts/*; without one the host tests
are skipped with that reason, and the core suite still runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def find_comfyui_checkouts() -> list[Path]:
    candidates = [Path(p) for p in os.environ.get("COMFYUI_PATH", "").split(os.pathsep) if p]
    home = Path.home()
    candidates.append(home / "ComfyUI")
    if (home / "comfy-hosts").is_dir():
        candidates += sorted((home / "comfy-hosts").iterdir())
    found, seen = [], set()
    for path in candidates:
        if (path / "comfy" / "model_patcher.py").is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            found.append(path)
    return found


CHECKOUTS = find_comfyui_checkouts()
NO_HOST = "no ComfyUI checkout found (set COMFYUI_PATH or put one in $HOME/ComfyUI): host tests not run"


def _version(path: Path) -> str:
    text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").is_file() else ""
    return text.split('"')[-2] if '"' in text else path.name


@pytest.mark.host
@pytest.mark.parametrize(
    "checkout",
    [pytest.param(p, id=_version(p)) for p in CHECKOUTS]
    or [pytest.param(None, marks=pytest.mark.skip(reason=NO_HOST))],
)
def test_comfyui_host(checkout):
    env = dict(os.environ, WAN22_COMFYUI=str(checkout), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "tests" / "host"),
        "-o",
        "python_files=host_*.py",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(ROOT),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    output = proc.stdout + proc.stderr
    print(output[-6000:])
    assert proc.returncode == 0, f"host tests failed on ComfyUI {_version(checkout)}:\n{output[-12000:]}"
