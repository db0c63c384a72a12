"""Runs the host tests (tests/host/host_*.py) once per ComfyUI checkout, each in its own process.

ComfyUI's modules are process-global, so every checkout gets a fresh interpreter. Checkouts are found
in this order: the ComfyUI the pack is installed in (ComfyUI/custom_nodes/<pack>), COMFYUI_PATH
(':'-separated), $HOME/ComfyUI and $HOME/comfy-hosts/*; without one the host tests are skipped with that
reason, and the core suite still runs. .ci/run uses find_comfyui_checkouts() too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file()


def enclosing_comfyui(pack_root: Path = ROOT) -> Path | None:
    """The ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack>), if it is."""
    parent = pack_root.parent
    if parent.name == "custom_nodes" and is_comfyui(parent.parent):
        return parent.parent
    return None


def find_comfyui_checkouts(
    pack_root: Path = ROOT, home: Path | None = None, comfyui_path: str | None = None
) -> list[Path]:
    """ComfyUI checkouts to test against, in this order: the ComfyUI the pack is installed in (the user's
    own, two folders up), COMFYUI_PATH (':'-separated), $HOME/ComfyUI, $HOME/comfy-hosts/*."""
    if comfyui_path is None:
        comfyui_path = os.environ.get("COMFYUI_PATH", "")
    home = Path.home() if home is None else home
    candidates = [p for p in [enclosing_comfyui(pack_root)] if p is not None]
    candidates += [Path(p) for p in comfyui_path.split(os.pathsep) if p]
    candidates.append(home / "ComfyUI")
    if (home / "comfy-hosts").is_dir():
        candidates += sorted((home / "comfy-hosts").iterdir())
    found, seen = [], set()
    for path in candidates:
        if is_comfyui(path) and path.resolve() not in seen:
            seen.add(path.resolve())
            found.append(path)
    return found


CHECKOUTS = find_comfyui_checkouts()
NO_HOST = (
    "no ComfyUI checkout found (install the pack in ComfyUI/custom_nodes/, set COMFYUI_PATH or put one in "
    "$HOME/ComfyUI): host tests not run"
)


def _version(path: Path) -> str:
    text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").is_file() else ""
    return text.split('"')[-2] if '"' in text else path.name


PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
try:
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management, comfy.sample, comfy.sd, nodes  # noqa
except ModuleNotFoundError as e:
    print(e.name)
"""


def _missing_requirement(checkout: Path) -> str | None:
    """The first third-party module the checkout needs that this interpreter lacks, if any."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(checkout)], capture_output=True, text=True, timeout=300
    )
    name = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return name or None


def _host_command() -> list[str]:
    return [
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


@pytest.fixture(scope="module")
def host_runs(tmp_path_factory):
    """Every checkout's host tests, started together (each in its own process, one thread each: the tiny
    models gain nothing from more), so the checkouts share the machine's cores instead of queueing."""
    runs = {}
    logs = tmp_path_factory.mktemp("host_logs")
    for checkout in CHECKOUTS:
        missing = _missing_requirement(checkout)
        if missing:
            runs[checkout] = missing
            continue
        env = dict(
            os.environ,
            WAN22_COMFYUI=str(checkout),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        log = open(logs / f"{_version(checkout)}.log", "w+")  # noqa: SIM115 - closed when the test reads it
        runs[checkout] = (
            subprocess.Popen(_host_command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    yield runs
    for run in runs.values():
        if isinstance(run, tuple) and run[0].poll() is None:
            run[0].kill()


@pytest.mark.host
@pytest.mark.parametrize(
    "checkout",
    [pytest.param(p, id=_version(p)) for p in CHECKOUTS]
    or [pytest.param(None, marks=pytest.mark.skip(reason=NO_HOST))],
)
def test_comfyui_host(checkout, host_runs):
    run = host_runs[checkout]
    if isinstance(run, str):
        reason = (
            f"ComfyUI checkout {checkout} found, but this Python lacks its requirement {run!r}: install "
            f"{checkout / 'requirements.txt'} (without its torch lines), as .ci/run does"
        )
        if os.environ.get("WAN22_REQUIRE_HOSTS") == "1":  # .ci/run installed them: missing is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    proc, log = run
    try:
        returncode = proc.wait(timeout=2400)
    except subprocess.TimeoutExpired:
        proc.kill()
        returncode = "timeout"
    log.seek(0)
    output = log.read()
    log.close()
    print(output[-6000:])
    assert returncode == 0, f"host tests failed on ComfyUI {_version(checkout)}:\n{output[-12000:]}"
