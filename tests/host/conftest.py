"""Host tests run only in a child process with WAN22_COMFYUI set (see tests/test_comfyui_hosts.py)."""

import os

import pytest

if not os.environ.get("WAN22_COMFYUI"):
    collect_ignore_glob = ["host_*.py"]


@pytest.fixture(autouse=True)
def _fresh_comfy_state():
    """Each test starts with nothing loaded, so earlier tests' models cannot change its memory math."""
    import comfy.model_management as mm

    yield
    mm.unload_all_models()
    mm.interrupt_current_processing(False)
