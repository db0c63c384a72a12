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


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """ComfyUI's diffusion_models folder pointed at an empty temporary folder for this test."""
    import folder_paths

    from wan22_blockswap import loader

    root = tmp_path / "diffusion_models"
    root.mkdir()
    _paths, extensions = folder_paths.folder_names_and_paths["diffusion_models"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(root)], extensions))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, loader.GGUF_FOLDER, raising=False)
    return root
