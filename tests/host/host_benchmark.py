"""test_performance.py --compare-native inside a real ComfyUI (CPU mode: wiring, not timings)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compare_native_runs_both_offloaders_on_the_same_comfyui_model(tmp_path):
    spec = importlib.util.spec_from_file_location("_wan22_benchmark_cli_host", ROOT / "test_performance.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli
    spec.loader.exec_module(cli)
    out = tmp_path / "bench.json"
    argv = [
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--tokens",
        "1560",
        "--blocks-to-swap",
        "4",
        "--compare-native",
        "--comfyui-path",
        os.environ["WAN22_COMFYUI"],
        "--output",
        str(out),
    ]
    assert cli.main(argv) == 0
    native = json.loads(out.read_text())["native_comparison"]
    assert native["comfyui_version"] and native["device"] == "cpu"
    (row,) = native["rows"]
    assert row["tokens"] == 1560 and row["blocks_swapped"] == 4
    assert row["blockswap_step_s"] > 0 and row["native_step_s"] > 0
    assert row["blockswap_vs_native"] == round(row["blockswap_step_s"] / row["native_step_s"], 3)
    assert row["weight_budget_mb"] > 0
