"""pyproject.toml as the Comfy registry reads it: parsed by ComfyUI's own registry config types
(`comfy_config`, shipped in the checkouts since 0.3.4x), in every checkout the host tests use that has them.

comfy_config drops what it does not know (pydantic ignores unknown keys; an OS or accelerator classifier
outside its list empties the whole list), so the test checks that each [tool.comfy] key is one it reads
and that the parsed values are the ones written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
try:
    from comfy_config import config_parser, types
except ModuleNotFoundError as e:
    print(json.dumps({"missing": e.name}))
    raise SystemExit(0)
from pathlib import Path
root = Path(sys.argv[2])
cfg = config_parser.extract_node_configuration(str(root))
raw = config_parser.load_pyproject_settings(root / "pyproject.toml").tool.get("comfy", {})
known = set()
for name, field in types.ComfyConfig.model_fields.items():
    known.add(field.alias or name)
version = {}
exec((Path(sys.argv[1]) / "comfyui_version.py").read_text(), version)
print(json.dumps({
    "config": cfg.model_dump(),
    "raw_keys": sorted(raw),
    "known_keys": sorted(known),
    "comfyui_version": version["__version__"],
}))
"""


def _checkouts_with_comfy_config() -> list[Path]:
    spec = importlib.util.spec_from_file_location("_wan22_hosts_pp", ROOT / "tests" / "test_comfyui_hosts.py")
    hosts = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = hosts
    spec.loader.exec_module(hosts)
    return [p for p in hosts.find_comfyui_checkouts() if (p / "comfy_config" / "types.py").is_file()]


CHECKOUTS = _checkouts_with_comfy_config()


def _parsed(checkout: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(checkout), str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "missing" in out:
        reason = f"{checkout}: comfy_config needs {out['missing']!r}, not installed in this Python"
        if os.environ.get("WAN22_REQUIRE_HOSTS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return out


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _satisfies(version: str, spec: str) -> bool:
    """`version` within a comma-separated list of >=, <=, <, > clauses (the form requires-comfyui uses here)."""
    ops = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
    }
    for clause in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|>|<)\s*([\d.]+)\s*", clause)
        assert m, f"requires-comfyui clause {clause!r} is not a plain version bound"
        if not ops[m.group(1)](_version_tuple(version), _version_tuple(m.group(2))):
            return False
    return True


@pytest.mark.parametrize(
    "checkout",
    [pytest.param(p, id=p.name) for p in CHECKOUTS]
    or [pytest.param(None, marks=pytest.mark.skip(reason="no ComfyUI checkout with comfy_config found"))],
)
def test_registry_fields_as_comfyui_reads_them(checkout):
    out = _parsed(checkout)
    cfg, comfy = out["config"], out["config"]["tool_comfy"]
    unknown = set(out["raw_keys"]) - set(out["known_keys"]) - {"requires-comfyui"}
    assert not unknown, f"[tool.comfy] keys comfy_config does not read: {sorted(unknown)}"
    # Publisher: a neutral id, no person's name; the registry's id rules (lowercase, digits, '-').
    assert re.fullmatch(r"[a-z][a-z0-9-]{2,}", comfy["publisher_id"]), comfy["publisher_id"]
    assert comfy["display_name"]
    # Icon: a committed image of a type and size the registry takes (SVG/PNG/JPG/GIF, at most 800x400).
    icon = ROOT / comfy["icon"]
    assert icon.suffix in (".png", ".jpg", ".gif", ".svg") and icon.is_file(), comfy["icon"]
    from PIL import Image

    with Image.open(icon) as image:
        assert image.width <= 800 and image.height <= 400, image.size
    # Classifiers survive the registry's validation (an invalid one would empty the list).
    assert cfg["project"]["supported_os"] == ["POSIX :: Linux"]
    assert cfg["project"]["supported_accelerators"] == ["GPU :: NVIDIA CUDA"]
    # The ComfyUI range covers every checkout the host tests run against, this one included.
    spec = cfg["project"]["supported_comfyui_version"]
    assert spec, "requires-comfyui not read"
    assert _satisfies(out["comfyui_version"], spec), (out["comfyui_version"], spec)
    for tested in ("0.3.64", "0.8.1", "0.33.0"):
        assert _satisfies(tested, spec), (tested, spec)
    assert re.fullmatch(r"\d+\.\d+\.\d+", cfg["project"]["version"])
    assert cfg["project"]["license"]["file"] == "LICENSE" and (ROOT / "LICENSE").is_file()


def test_requires_comfyui_check_rejects_versions_outside():
    """The range check above is not vacuous."""
    assert not _satisfies("0.3.63", ">=0.3.64,<=0.33.0")
    assert not _satisfies("0.34.0", ">=0.3.64,<=0.33.0")
    assert _satisfies("0.8.1", ">=0.3.64,<=0.33.0")
