"""The ComfyUI boundary: the engine and everything but the integration modules import no ComfyUI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "server", "execution")
COMFYUI_FREE = (
    "config",
    "utils",
    "block_manager",
    "host_memory",
    "staging",
    "tensor_layout",
    "wan.detect",
    "wan.units",
    "quant.dequant",
    "quant.reader",
    "bench.synthetic_model",
    "bench.gguf_writer",
)

PROBE = """
import importlib, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("cli", sys.argv[1])
cli = sys.modules["cli"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
cli.load_package()
for name in sys.argv[3].split(","):
    importlib.import_module(cli.PACKAGE + "." + name)
banned = sys.argv[2].split(",")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in banned)))
"""


def test_engine_modules_load_no_comfyui_module():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            str(ROOT / "test_performance.py"),
            ",".join(COMFYUI_MODULES),
            ",".join(COMFYUI_FREE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_ruff_rule_names_every_comfyui_module():
    """pyproject's banned-api list is the list this test checks (a module missing there is unguarded)."""
    text = (ROOT / "pyproject.toml").read_text()
    for module in COMFYUI_MODULES:
        assert f'"{module}".msg' in text, module
