"""Host RAM like a small machine: a memory cgroup (v1) caps a child process, anonymous memory over the cap
kills it, page cache is evicted and read again. The child (benchmarks/host_ram_tiers.py --child checks)
imports this ComfyUI once and reports; this test makes the files and the cgroup and checks the figures.

- WAN-shaped GGUF through ComfyUI-GGUF's loader and through ours, every block swapped, host_memory=file:
  the anonymous RSS BlockSwap adds is at most the staging ring plus 5 % of the swapped bytes (the ring is
  made only where copies are asynchronous, a CUDA device: none on CPU, which the report shows), outputs
  equal the unswapped model's bit for bit, also after the file's page cache was dropped;
- a high/low pair (two such files) taking turns, host_memory=auto, under a cap of the process's anonymous
  RSS plus half the pair's swapped bytes (slabs for both would not fit): completes, outputs equal the
  uncapped unswapped ones, auto chose the file tier, the cgroup had to reclaim (page cache) on the way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "host_ram_tiers.py"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
COMFY_GGUF = Path(os.environ.get("COMFYUI_GGUF_PATH") or Path.home() / "comfy-hosts" / "ComfyUI-GGUF")


def _cgroup_v1_writable() -> str | None:
    """Why the cgroup tests cannot run here, or None."""
    if not (CGROUP_ROOT / "cgroup.procs").is_file():
        return f"no cgroup v1 memory controller at {CGROUP_ROOT}"
    probe = CGROUP_ROOT / f"wan22_probe_{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cgroup v1 memory is not writable here ({exc.strerror}; needs root)"
    return None


pytestmark = [
    pytest.mark.skipif(_cgroup_v1_writable() is not None, reason=str(_cgroup_v1_writable())),
    pytest.mark.skipif(
        not (COMFY_GGUF / "nodes.py").is_file(), reason=f"ComfyUI-GGUF not found at {COMFY_GGUF}"
    ),
]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import host_ram_tiers
    finally:
        sys.path.remove(str(SCRIPT.parent))
    folder = tmp_path_factory.mktemp("ram")
    high, low = folder / "wan_high.gguf", folder / "wan_low.gguf"
    host_ram_tiers.write_file(high, "test", "Q8_0")
    host_ram_tiers.write_file(low, "test", "Q8_0", seed_offset=1000)
    cgroup = CGROUP_ROOT / f"wan22_test_{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    try:
        # Under half the pair's swapped bytes (blocks are ~80 % of these files; checked below on the report).
        margin = int(0.3 * (high.stat().st_size + low.stat().st_size))
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--child",
            "checks",
            "--comfyui",
            os.environ["WAN22_COMFYUI"],
            "--comfyui-gguf",
            str(COMFY_GGUF),
            "--file",
            str(high),
            "--file2",
            str(low),
            "--host-memory",
            "auto",
            "--margin",
            str(margin),
        ]
        # Only the child goes into the cgroup: its shell puts itself there, then becomes python.
        shell = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
        proc = subprocess.run(["sh", "-c", shell, "sh", *cmd], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        cgroup.rmdir()


@pytest.mark.parametrize("loader", ["comfyui-gguf", "ours"])
def test_file_tier_adds_almost_no_anonymous_ram_and_samples_bit_identically(checks, loader):
    single = next(s for s in checks["singles"] if s["loader"] == loader)
    assert single["file_units"] == 4 and single["pinned_units"] == single["pageable_units"] == 0
    swapped = single["swapped_bytes"]
    assert single["file_bytes"] >= 0.95 * swapped  # the norms ComfyUI copied are all that is not the file's
    assert single["staging_bytes"] == 0  # CPU compute: a file unit is copied straight into its slot
    assert single["added_by_blockswap"] <= single["staging_bytes"] + 0.05 * swapped, single
    assert single["equal"] and single["equal_after_drop"]


def test_a_pair_taking_turns_under_a_cap_below_its_swapped_bytes_completes_bit_identically(checks):
    pair = checks["pair"]
    swapped = sum(t["swapped_bytes"] for t in pair["tiers"])
    # Beside a sampling step's own needs, room for half the pair's swapped bytes: slabs would not fit.
    assert pair["limit"] - pair["anon_at_cap"] - pair["step"] < swapped / 2 + 2**20
    assert all(pair["equal"]) and len(pair["equal"]) == 4
    assert all(t["file_units"] == 4 for t in pair["tiers"])  # auto saw the cgroup's RAM, not the machine's
