"""Which ComfyUI checkouts the host tests run against: the user's own ComfyUI first when the pack is
installed in it (ComfyUI/custom_nodes/<pack>), then COMFYUI_PATH, $HOME/ComfyUI, $HOME/comfy-hosts/*."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _hosts_module():
    spec = importlib.util.spec_from_file_location("_wan22_hosts", ROOT / "tests" / "test_comfyui_hosts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


HOSTS = _hosts_module()


def _comfyui(path: Path) -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "comfy" / "model_patcher.py").write_text("")
    return path


def test_the_comfyui_the_pack_is_installed_in_comes_first(tmp_path):
    user = _comfyui(tmp_path / "ComfyUI")
    pack = user / "custom_nodes" / "ComfyUI-Wan22Blockswap"
    pack.mkdir(parents=True)
    home = tmp_path / "home"
    other = _comfyui(home / "comfy-hosts" / "0.8.1")
    listed = _comfyui(tmp_path / "listed")
    found = HOSTS.find_comfyui_checkouts(pack_root=pack, home=home, comfyui_path=str(listed))
    assert found == [user, listed, other]


def test_the_enclosing_comfyui_is_listed_once(tmp_path):
    user = _comfyui(tmp_path / "home" / "ComfyUI")
    pack = user / "custom_nodes" / "wan22"
    pack.mkdir(parents=True)
    found = HOSTS.find_comfyui_checkouts(pack_root=pack, home=tmp_path / "home", comfyui_path=str(user))
    assert found == [user]


def test_a_folder_that_is_not_a_comfyui_is_not_a_host(tmp_path):
    # custom_nodes/ under a folder without comfy/model_patcher.py, and a pack not in custom_nodes/.
    pack = tmp_path / "NotComfy" / "custom_nodes" / "pack"
    pack.mkdir(parents=True)
    assert HOSTS.enclosing_comfyui(pack) is None
    beside = _comfyui(tmp_path / "ComfyUI")
    loose = beside / "somewhere" / "pack"
    loose.mkdir(parents=True)
    assert HOSTS.enclosing_comfyui(loose) is None
    assert HOSTS.find_comfyui_checkouts(pack_root=loose, home=tmp_path / "nohome", comfyui_path="") == []


def test_ci_run_uses_the_same_discovery():
    """.ci/run installs the requirements of the checkouts this module finds (not a copy of its rules)."""
    text = (ROOT / ".ci" / "run").read_text()
    assert "find_comfyui_checkouts" in text
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
