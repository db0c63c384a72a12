"""test_performance.py end to end on a tiny model (CPU), and its argument checking."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("test_performance_cli_module", ROOT / "test_performance.py")
cli = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cli  # dataclasses look their module up
spec.loader.exec_module(cli)


def test_cli_runs_end_to_end_and_writes_every_key(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert (
        cli.main(["--preset", "tiny", "--steps", "1", "--tokens", "32", "--test-all", "--output", str(out)])
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["smoke_run"] is True and doc["machine"]["gpu"] is None
    assert doc["workload"]["layers"] == 4 and doc["workload"]["tokens"] == [32]
    rows = doc["results"]
    assert [r["blocks_to_swap"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        for key in cli.ORIGINAL_ROW_KEYS:
            assert key in row, key
        assert row["memory_with_swap"]["gpu_peak_allocated_mb"] == "n/a (no GPU)"
        assert row["gpu_savings_mb"] is None
        assert row["step_time_s"] > 0
    full = rows[-1]
    # Every swapped block is copied once per timed step (4 blocks, 1 step, no prefetch).
    assert full["bytes_moved_per_step"] >= full["swapped_weights_mb"] * 2**20 > 0
    assert full["on_demand_copies_per_step"] == 4
    printed = capsys.readouterr().out
    assert "smoke run of the machinery" in printed and "not a performance result" in printed
    assert "n/a (no GPU)" in printed


def test_json_only_prints_just_the_document(tmp_path, capsys):
    out = tmp_path / "r.json"
    cli.main(
        [
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--tokens",
            "16",
            "--blocks-to-swap",
            "2",
            "--json-only",
            "--output",
            str(out),
        ]
    )
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())


def test_model_path_reads_a_wan_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    from wan22_blockswap.bench import synthetic_model as sm

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sm.build_model("tiny", "i2v").state_dict().items()}, str(path))
    out = tmp_path / "r.json"
    cli.main(
        [
            "--model-path",
            str(path),
            "--steps",
            "1",
            "--tokens",
            "16",
            "--blocks-to-swap",
            "4",
            "--output",
            str(out),
            "--json-only",
        ]
    )
    doc = json.loads(out.read_text())
    assert doc["workload"]["variant"] == "i2v" and doc["results"][1]["model_path"] == str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--blocks-to-swap", "-1"], "must be >= 0"),
        (["--steps", "0"], "must be >= 1"),
        (["--tokens", "12,x"], "comma-separated integers"),
        (["--resolution", "832"], "WIDTHxHEIGHT"),
        (["--preset", "70b"], "invalid choice"),
        (["--tokens", "16", "--resolution", "832x480"], "either --tokens or --resolution"),
    ],
)
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_too_many_blocks_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(
        SystemExit, match=r"--blocks-to-swap must be between 0 and 4 for this model \(got 9\)"
    ):
        cli.main(["--preset", "tiny", "--blocks-to-swap", "9"])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["--model-path", str(tmp_path / "missing.safetensors")])
    from safetensors.torch import save_file

    not_wan = tmp_path / "not_wan.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(not_wan))
    with pytest.raises(SystemExit, match="not a WAN diffusion model.*head.modulation"):
        cli.main(["--model-path", str(not_wan)])
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SystemExit, match="GGUF files .* need ComfyUI: pass --comfyui PATH"):
        cli.main(["--model-path", str(gguf)])


def test_tokens_for_video_match_wan_latent_geometry():
    assert cli.tokens_for_video("14b", 832, 480, 81) == 32760
    assert cli.tokens_for_video("5b", 1280, 704, 121) == 31 * 22 * 40


def test_host_tiers_rows_measure_each_tier_and_the_anonymous_ram(tmp_path):
    out = tmp_path / "tiers.json"
    argv = ["--preset", "tiny", "--layers", "4", "--blocks-to-swap", "4", "--steps", "1", "--tokens", "16"]
    assert cli.main([*argv, "--host-tiers", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["tier"] for r in rows] == ["-", "file", "file-cold", "pageable"]  # no GPU: no pinned row
    by_tier = {r["tier"]: r for r in rows}
    for tier in ("file", "file-cold"):
        assert (
            by_tier[tier]["host_tiers"]["file_units"] == 4
            and by_tier[tier]["host_tiers"]["pageable_units"] == 0
        )
    assert by_tier["pageable"]["host_tiers"]["pageable_units"] == 4
    assert by_tier["pageable"]["bytes_moved_per_step"] == by_tier["file"]["bytes_moved_per_step"] > 0
    assert all(isinstance(r.get("ram_anon_increase_mb"), float) for r in rows)
    assert not out.with_suffix(".blocks.bin").exists()  # the blocks' file is removed afterwards
