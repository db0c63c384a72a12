"""test_performance.py --compare-native inside a real ComfyUI (CPU mode: wiring, not timings)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

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


NUMERIC_COLUMNS = (
    "step_time_s",
    "load_time_s",
    "file_load_s",
    "device_load_s",
    "weights_on_device_mb",
    "copy_ms_per_block",
    "compute_ms_per_block",
    "block_ms_per_block",
    "bytes_moved_per_step",
    "cpu_rss_mb",
    "time_difference_percent",
)


COMFY_GGUF = Path(os.environ.get("COMFYUI_GGUF_PATH") or Path.home() / "comfy-hosts" / "ComfyUI-GGUF")


def _write_files(tmp_path):
    from gguf import GGMLQuantizationType as T

    from wan22_blockswap.bench.gguf_writer import write_wan_gguf

    from .comfy_helpers import checkpoint_state_dict, write_checkpoint, write_fp8_scaled_checkpoint

    safetensors_path = write_checkpoint(tmp_path, "t2v")
    gguf_path = tmp_path / "tiny_wan.gguf"
    write_wan_gguf(gguf_path, checkpoint_state_dict("t2v"), lambda name, t: T.Q8_0)
    return safetensors_path, gguf_path, write_fp8_scaled_checkpoint(tmp_path)


def _cli():
    spec = importlib.util.spec_from_file_location("_wan22_benchmark_cli_host", ROOT / "test_performance.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli
    spec.loader.exec_module(cli)
    return cli


def test_model_path_runs_comfyui_wanmodel_against_native_offloading_with_a_chart(tmp_path):
    cli = _cli()
    from wan22_blockswap.bench import report

    for path in _write_files(tmp_path):  # safetensors, GGUF Q8_0, fp8_scaled
        out, chart = tmp_path / f"{path.stem}.json", tmp_path / f"{path.stem}.png"
        argv = ["--model-path", str(path), "--steps", "1", "--resolution", "64x64", "--frames", "1"]
        argv += ["--blocks-to-swap", "2", "--output", str(out), "--chart", str(chart)]
        with_city96 = path.suffix == ".gguf" and COMFY_GGUF.is_dir()
        if with_city96:
            argv += ["--comfyui-gguf", str(COMFY_GGUF)]
        assert cli.main(argv) == 0
        doc = json.loads(out.read_text())
        assert doc["comfyui"]["model_class"] == "WanModel"
        rows = doc["results"]
        expected = {"resident", "blockswap", "comfyui_lowvram"} | ({"comfyui_gguf"} if with_city96 else set())
        assert {r["contender"] for r in rows} >= expected
        for row in rows:
            assert row["error"] is None, row
            for key in cli.ORIGINAL_ROW_KEYS:
                assert key in row
            for key in NUMERIC_COLUMNS:
                assert isinstance(row[key], (int, float)), (row["contender"], key, row[key])
            assert row["peak_vram_mb"] == "n/a (no GPU)"
        assert "no GPU" in doc["recommendation"]
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        plotted = report.write_chart(rows, str(tmp_path / "again.png"), "t")
        assert plotted == {
            video: {
                label: {"x": line["x"], "step_time_s": line["step_time_s"]} for label, line in lines.items()
            }
            for video, lines in report.chart_series(rows).items()
        }


def test_vram_limit_is_refused_on_cpu_and_bad_files_get_the_loaders_errors(tmp_path, capsys):
    import pytest

    cli = _cli()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model-path", str(tmp_path / "x.safetensors"), "--vram-limit", "12"])
    assert exc.value.code == 2 and "this machine has no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["--model-path", str(tmp_path / "missing.safetensors")])
    from safetensors.torch import save_file

    not_wan = tmp_path / "sd15.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(not_wan))
    with pytest.raises(SystemExit, match="sd15.safetensors: not a WAN 2.1/2.2 diffusion model"):
        cli.main(["--model-path", str(not_wan), "--output", str(tmp_path / "r.json")])


def test_auto_rows_are_loaded_as_the_sampler_loads_and_compared_with_the_best_fixed_row(tmp_path):
    """CPU smoke run of --auto: a row per video with the blocks the plan swapped (none: in CPU mode
    ComfyUI grants the whole model) and a comparison with the fastest fixed blocks_to_swap row."""
    cli = _cli()
    path = _write_files(tmp_path)[0]
    out = tmp_path / "auto.json"
    argv = ["--model-path", str(path), "--steps", "1", "--resolution", "64x64", "--frames", "1", "--auto"]
    assert cli.main(argv + ["--blocks-to-swap", "2", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    (auto,) = [r for r in doc["results"] if r["contender"] == "blockswap_auto"]
    assert auto["error"] is None and auto["blocks_to_swap"] == 0 and auto["step_time_s"] > 0
    (line,) = doc["auto_vs_best_fixed"]
    assert line["auto_blocks_to_swap"] == 0 and line["best_fixed_blocks_to_swap"] in (0, 2)
    assert "fastest fixed" in line["text"]
