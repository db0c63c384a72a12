"""Test bootstrap: import the repository as a package, whatever its folder is called.

The pack's modules use relative imports (as every ComfyUI custom node must), so the tests load the
repository root as the package `wan22_blockswap`, the same way ComfyUI loads it from custom_nodes/.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "wan22_blockswap"


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
