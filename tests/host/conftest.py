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


@pytest.fixture(autouse=True)
def _non_blocking_by_default(monkeypatch):
    """WAN22_NON_BLOCKING=1 (the GPU check sets it): the BlockSwap nodes' use_non_blocking is True wherever a
    test leaves it at its default, so the host tests run the pinned, asynchronous path a GPU user enables."""
    if os.environ.get("WAN22_NON_BLOCKING") != "1":
        return
    from wan22_blockswap import config, nodes

    def non_blocking_config(**settings):
        if not settings:  # SwapConfig(): the defaults the nodes list in INPUT_TYPES, left as they are
            return config.SwapConfig()
        return config.SwapConfig(**{"use_non_blocking": True, **settings})

    monkeypatch.setattr(nodes, "SwapConfig", non_blocking_config)
