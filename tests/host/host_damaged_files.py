"""Damaged WAN files through the WAN Model Loader, seeded and bounded (benchmarks/damaged_files.py does
the work; a longer run is that script's command line), then the damage a fuzz does not aim at: blocks
renamed or dropped in the middle (ComfyUI would build a shorter model), and valid files the damaged-file
bounds must still accept (a 5-D tensor as gguf's own writer stores it).

Every fuzz case runs in a worker process (several cases per worker) under a per-case timeout and an
address-space cap, and must end in a clear refusal (a ValueError naming the file) or in a model equal to
the undamaged one, with peak RSS growth under 2x the file's size plus a fixed allowance.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import comfy.model_management as mm
import gguf
import pytest
import torch

from wan22_blockswap import nodes
from wan22_blockswap.bench import comfy_bench

from .comfy_helpers import checkpoint_state_dict, sample
from .host_benchmark import _cli
from .host_loader import COMFY_GGUF, _import_comfyui_gguf, _refuse_loading, _write_as, load_node, place

ROOT = Path(__file__).resolve().parents[2]
CASES_PER_FORMAT = 260  # 20 of each kind of damage
SEED = 16


def _fuzz_module():
    spec = importlib.util.spec_from_file_location(
        "wan22_damaged_files", ROOT / "benchmarks" / "damaged_files.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz():
    module = _fuzz_module()
    started = time.perf_counter()
    cases = module.plan_cases(SEED, CASES_PER_FORMAT)
    results = module.run_cases(cases, os.environ["WAN22_COMFYUI"], workers=2, timeout=10.0)
    return module, results, time.perf_counter() - started


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_every_damaged_file_is_refused_by_name_or_loads_as_the_undamaged_model(fuzz, fmt):
    module, results, seconds = fuzz
    rows = [r for r in results if r["format"] == fmt]
    summary = module.summarize(results)[fmt]
    logging.getLogger(__name__).info("[BlockSwap] damaged %s files: %s (%.1f s)", fmt, summary, seconds)
    failures = [
        f"{r['id']} {r['kind']}: {r['outcome']}: {r.get('message', '')}"
        for r in rows
        if r["outcome"] in module.FAILURES
    ]
    assert not failures, "\n".join(failures)
    assert len(rows) == CASES_PER_FORMAT
    assert set(summary["by_kind"]) == set(module.DAMAGE[fmt])  # every kind of damage ran
    # Damage a loader can see is refused: truncations, lying lengths, missing and renamed tensors.
    for kind in ("truncate", "drop"):
        assert summary["by_kind"][kind] == {"refused": CASES_PER_FORMAT // len(module.DAMAGE[fmt])}
    assert all(r["peak_growth"] <= 2 * r["size"] + 64 * 2**20 for r in rows)


def test_the_run_is_bounded(fuzz):
    _module, results, seconds = fuzz
    assert len(results) == 2 * CASES_PER_FORMAT
    assert seconds < 120, f"{len(results)} cases took {seconds:.0f} s"
    assert max(r["seconds"] for r in results) < 10


# --------------------------------------------------------------------------------------------
# Blocks renamed or dropped in the middle: ComfyUI counts blocks up to the first gap
# --------------------------------------------------------------------------------------------


def _with_blocks_damaged(damage: str) -> dict:
    """An 8-block t2v state dict with blocks.7 renamed blocks.9, or every blocks.3 tensor dropped."""
    sd = checkpoint_state_dict("t2v", num_layers=8)
    if damage == "renamed":
        return {
            k.replace("blocks.7.", "blocks.9.", 1) if k.startswith("blocks.7.") else k: v
            for k, v in sd.items()
        }
    return {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}


def _combined_loader(fmt: str, name: str):
    (model,) = nodes.WAN22BlockSwapLoader().load_model(
        fmt,
        name if fmt == "safetensors" else "none",
        name if fmt == "gguf" else "none",
        "auto",
        "auto",
        "disabled",
        "auto",
        blocks_to_swap=2,
        prefetch_blocks=1,
    )
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("damage", ["renamed", "dropped"])
def test_blocks_renamed_or_dropped_in_the_middle_are_refused_naming_the_unused_tensors(
    model_dir, monkeypatch, fmt, damage
):
    """ComfyUI itself builds a 7- (3-) block model from such a file, warning only "unet unexpected"."""
    damaged = _with_blocks_damaged(damage)
    name = _write_as(fmt, damaged, model_dir / f"{damage}.{fmt}")
    unbuilt = ("blocks.9.",) if damage == "renamed" else tuple(f"blocks.{i}." for i in range(4, 8))
    unused = sum(1 for k in damaged if k.startswith(unbuilt))
    _refuse_loading(monkeypatch)
    loads = {
        "WAN Model Loader": lambda: load_node(fmt, **{f"{fmt}_model": name}),
        "WAN BlockSwap Model Loader": lambda: _combined_loader(fmt, name),
        "test_performance.py --model-path": lambda: _cli().main(
            ["--model-path", str(model_dir / name), "--steps", "1", "--resolution", "64x64", "--frames", "1"]
        ),
    }
    for what, load in loads.items():
        with pytest.raises((ValueError, SystemExit)) as refused:
            load()
        message = str(refused.value).removeprefix("--model-path: ")
        assert message.startswith(f"{name} is damaged or not a WAN file: {unused} of its tensors"), what
        assert f"({7 if damage == 'renamed' else 3} blocks;" in message, what
        assert f": {unbuilt[0]}" in message and f"and {unused - 5} more" in message, what
        assert not mm.current_loaded_models, what


def test_a_negative_orig_shape_dimension_is_refused_naming_the_file_and_the_tensor(model_dir):
    """Two negative dims multiply to the stored count; torch's reshape error named no file."""
    sd = checkpoint_state_dict("t2v")
    patch = sd.pop("patch_embedding.weight")
    writer = gguf.GGUFWriter(str(model_dir / "negative.gguf"), "wan")
    writer.add_array(
        "comfy.gguf.orig_shape.patch_embedding.weight", [-patch.shape[0], -patch.shape[1], 1, 2, 2]
    )
    writer.add_tensor("patch_embedding.weight", patch.reshape(-1, 1, 2, 2).numpy())
    for key, value in sd.items():
        writer.add_tensor(key, value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match=r"negative\.gguf: tensor 'patch_embedding\.weight': .* negative dim"
    ):
        load_node("gguf", gguf_model="negative.gguf")
    assert not mm.current_loaded_models


# --------------------------------------------------------------------------------------------
# Valid files the bounds must accept
# --------------------------------------------------------------------------------------------


def _write_gguf_as_gguf_writes_it(path: Path, sd: dict) -> Path:
    """GGUFWriter given the arrays as they are (no orig_shape convention): the 5-D patch embedding is
    stored with 5 dims. Block weights Q8_0, the rest F32."""
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, value in sd.items():
        array = value.float().numpy()
        if key.startswith("blocks.") and array.ndim == 2 and array.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.skipif(not COMFY_GGUF.is_dir(), reason=f"ComfyUI-GGUF not found at {COMFY_GGUF}")
def test_a_five_dim_tensor_as_gguf_writes_it_loads_and_samples_as_comfyui_gguf_samples_it(
    model_dir, tmp_path
):
    path = _write_gguf_as_gguf_writes_it(tmp_path / "five_dims.gguf", checkpoint_state_dict("t2v"))
    (stored,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "patch_embedding.weight"]
    assert len(stored.shape) == 5
    (name,) = place(model_dir, path)
    gguf_nodes = sys.modules.get("ComfyUI-GGUF.nodes") or _import_comfyui_gguf()
    (city,) = gguf_nodes.UnetLoaderGGUF().load_unet(name, dequant_dtype="float32")
    reference = sample(city)
    ours = load_node("gguf", gguf_model=name)
    assert ours.model.diffusion_model.patch_embedding.weight.shape == (128, 16, 1, 2, 2)
    torch.testing.assert_close(sample(ours), reference, rtol=1e-5, atol=1e-5)
    # The benchmark's --model-path loads through the same path.
    patcher, _seconds = comfy_bench.load_with_pack_loader(str(path))
    assert patcher.model.diffusion_model.patch_embedding.weight.shape == (128, 16, 1, 2, 2)
