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
PACKAGE = "wan22_blockswap"  # the name test_performance.load_package() gives the repository

_host = os.environ.get("WAN22_COMFYUI")
if _host:
    sys.path.insert(0, _host)
    import comfy.cli_args

    # Before comfy.model_management is imported: CPU mode unless the child was asked for the GPU.
    comfy.cli_args.args.cpu = os.environ.get("WAN22_COMFYUI_GPU") != "1"
    # ComfyUI command-line switches for a GPU run, e.g. WAN22_COMFYUI_FLAGS=highvram or async_offload.
    for flag in filter(None, os.environ.get("WAN22_COMFYUI_FLAGS", "").split(",")):
        setattr(comfy.cli_args.args, flag, True)


def _load_package():
    """The benchmark script knows how to import the repository as a package: reuse it."""
    spec = importlib.util.spec_from_file_location("_wan22_benchmark_cli", ROOT / "test_performance.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli
    spec.loader.exec_module(cli)
    return cli.load_package()


_load_package()
logging.getLogger(PACKAGE).setLevel(logging.DEBUG)
