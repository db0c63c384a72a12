"""Test bootstrap: import the repository as a package, whatever its folder is called.

The pack's modules use relative imports (as every ComfyUI custom node must), so the tests load the
repository root as the package `wan22_blockswap`, the same way ComfyUI loads it from custom_nodes/.

Host tests (tests/host/host_*.py) run in a child process per ComfyUI checkout, which sets
WAN22_COMFYUI to that checkout: it goes on sys.path, in CPU mode, before the package is imported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "wan22_blockswap"

_host = os.environ.get("WAN22_COMFYUI")
if _host:
    sys.path.insert(0, _host)
    import comfy.cli_args

    # Before comfy.model_management is imported: CPU mode unless the child was asked for the GPU.
    comfy.cli_args.args.cpu = os.environ.get("WAN22_COMFYUI_GPU") != "1"


def _load_package():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


_load_package()
logging.getLogger(PACKAGE).setLevel(logging.DEBUG)
