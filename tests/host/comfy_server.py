"""A real ComfyUI server for tests and scripts: `main.py --cpu` of one checkout, on a free loopback port.

Shared by host_server.py (HTTP API), host_browser.py (the real frontend in headless Chromium) and
scripts/make_example_workflows.py (node definitions from /object_info). No pytest here: failures raise
ServerError with the tail of the server's log.

The server gets a temporary base directory whose custom_nodes/ holds this repository (as the pack's
users install it), a test-only node package (tests/host/server_nodes: random WAN text conditioning,
since WAN's text encoder has no test-size version) and, where found, the WanVideoLooper pack.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_NODES = Path(__file__).resolve().parent / "server_nodes"
LOOPER = Path(os.environ.get("WANVIDEOLOOPER_PATH") or Path.home() / "comfy-hosts" / "WanVideoLooper")
PACK_DIR = "ComfyUI-Wan22Blockswap"  # the folder name the pack gets in custom_nodes/
TEST_NODES_DIR = "wan22_test_nodes"
HOST = "127.0.0.1"
START_TIMEOUT_S = 120

# Only loopback traffic: no proxy from the environment, whatever it says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    pass


class Server:
    def __init__(self, base: Path, port: int, log_path: Path):
        self.base = base
        self.port = port
        self.log_path = log_path
        self.url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen | None = None
        self.start_seconds = math.nan

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def tail(self, chars: int = 6000) -> str:
        return f"\n--- ComfyUI server log (tail) ---\n{self.log()[-chars:]}"

    def request(self, path: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, object]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, body

    def get(self, path: str) -> object:
        status, body = self.request(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body}{self.tail()}"
        return body


def _die_with_parent() -> None:
    """Runs in the server process before exec (Linux): SIGTERM it if this process dies first."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def install(base: Path) -> None:
    """The base directory's folders, with this pack, the test nodes and WanVideoLooper (if found)."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / PACK_DIR).symlink_to(ROOT, target_is_directory=True)
    (custom_nodes / TEST_NODES_DIR).symlink_to(TEST_NODES, target_is_directory=True)
    if (LOOPER / "wan_looper_node.py").is_file():  # for the looper example workflows
        (custom_nodes / "WanVideoLooper").symlink_to(LOOPER, target_is_directory=True)
    for folder in ("user", "input", "output", "temp", "models/diffusion_models"):
        (base / folder).mkdir(parents=True, exist_ok=True)


def templates_shim(checkout: Path, root: Path) -> Path | None:
    """A stand-in workflow-templates package for ComfyUI versions that cannot start without its folder.

    ComfyUI 0.3.64 (and others of its time) serves `<comfyui_workflow_templates>/templates` and stops at
    startup when that folder is missing; the template packages that newer ComfyUI versions need (one
    venv serves every checkout here) no longer have it. The shim, first on the server's PYTHONPATH, has
    an empty one.
    """
    frontend_management = checkout / "app" / "frontend_management.py"
    if not frontend_management.is_file() or '/ "templates"' not in frontend_management.read_text():
        return None
    spec = importlib.util.find_spec("comfyui_workflow_templates")
    if spec is None or spec.origin is None or (Path(spec.origin).parent / "templates").is_dir():
        return None
    shim = root / "shim"
    (shim / "comfyui_workflow_templates" / "templates").mkdir(parents=True)
    (shim / "comfyui_workflow_templates" / "__init__.py").write_text("")
    return shim


def installed_frontend() -> Path | None:
    """The static folder of the installed comfyui-frontend-package (what ComfyUI serves by default)."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if spec is None or spec.origin is None:
        return None
    static = Path(spec.origin).parent / "static"
    return static if (static / "index.html").is_file() else None


@contextlib.contextmanager
def running_server(
    checkout: Path,
    root: Path,
    frontend: Path | None = None,
    prepare=None,
    timeout_s: float = START_TIMEOUT_S,
    gpu: bool = False,
) -> Iterator[Server]:
    """Starts the server of `checkout` in `root` (a fresh folder) and stops it on exit.

    gpu: start it as users do on a GPU (no --cpu: ComfyUI's default device, allocator and, on 0.16+,
    dynamic VRAM); the default is `--cpu`.

    frontend: the folder served as the UI; None serves an empty folder (no UI, nothing fetched).
    prepare: called with the base directory after the install, before the start (model files).
    """
    base = root / "base"
    install(base)
    if prepare is not None:
        prepare(base)
    if frontend is None:
        frontend = root / "frontend"
        frontend.mkdir()
    srv = Server(base, free_port(), root / "server.log")
    cmd = [
        sys.executable,
        str(checkout / "main.py"),
        *([] if gpu else ["--cpu"]),
        "--listen",
        HOST,
        "--port",
        str(srv.port),
        "--base-directory",
        str(base),
        "--front-end-root",
        str(frontend),
        "--database-url",
        f"sqlite:///{base / 'user' / 'comfyui.db'}",  # default is inside the checkout
        "--disable-auto-launch",
        "--disable-api-nodes",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WAN22_COMFYUI", None)
    shim = templates_shim(checkout, root)
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    with open(srv.log_path, "wb") as log:
        started = time.monotonic()
        srv.proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    try:
        deadline = started + timeout_s
        while True:
            if srv.proc.poll() is not None:
                raise ServerError(f"ComfyUI server exited with code {srv.proc.returncode}{srv.tail()}")
            try:
                with _OPENER.open(f"{srv.url}/object_info/KSampler", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI server not answering after {timeout_s} s{srv.tail()}")
            time.sleep(0.25)
        srv.start_seconds = time.monotonic() - started
        yield srv
    finally:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=20)


def wait_for_history(srv: Server, prompt_id: str, timeout_s: float) -> dict:
    """The history entry of a queued prompt once it has run (raises ServerError on timeout or a dead server)."""
    deadline = time.monotonic() + timeout_s
    while True:
        history = srv.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        if srv.proc.poll() is not None:
            raise ServerError(f"ComfyUI server died while running the prompt{srv.tail()}")
        if time.monotonic() > deadline:
            raise ServerError(f"prompt {prompt_id} not done after {timeout_s} s{srv.tail()}")
        time.sleep(0.25)


# The tiny t2v prompt's sampling settings and nodes "3" to "7" (conditioning, latent, KSampler, SaveLatent),
# shared by the server test and the GPU check's server driver.
SEED, STEPS, CFG, FRAMES, SIZE = 0, 2, 2.0, 5, 64  # 5 frames -> 2 latent frames; 64 px -> 8x8 latent


def sample_and_save(model: list, prefix: str) -> dict:
    """Random conditioning (seeds SEED + 1 and SEED + 2, as comfy_helpers.sample() uses), an empty video
    latent, KSampler on `model` and SaveLatent under `prefix`."""
    return {
        "3": {"class_type": "Wan22TestRandomConditioning", "inputs": {"seed": SEED + 1, "tokens": 8}},
        "4": {"class_type": "Wan22TestRandomConditioning", "inputs": {"seed": SEED + 2, "tokens": 8}},
        "5": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": SIZE, "height": SIZE, "length": FRAMES, "batch_size": 1},
        },
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": SEED,
                "steps": STEPS,
                "cfg": CFG,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
    }
