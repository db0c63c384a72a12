"""The WAN Model Loader node inside a real ComfyUI (CPU mode): folders, safetensors vs UNETLoader, GGUF,
GGUF with BlockSwap and LoRA, ComfyUI-GGUF models with BlockSwap, and bad files."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import comfy.model_management as mm
import comfy.sd
import folder_paths
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import save_file

from wan22_blockswap import callbacks, loader, nodes
from wan22_blockswap.bench.gguf_writer import mixed_wan_qtypes, write_wan_gguf
from wan22_blockswap.quant.reader import GGUFWeight, load_gguf_state_dict

from .comfy_helpers import checkpoint_state_dict, load, sample, write_checkpoint

COMFY_GGUF = Path(os.environ.get("COMFYUI_GGUF_PATH") or Path.home() / "comfy-hosts" / "ComfyUI-GGUF")
SEED_INPUTS = [
    "model_type",
    "safetensors_model",
    "gguf_model",
    "wan_version",
    "model_variant",
    "fp8_optimization",
    "weight_dtype",
]


# These compare dtypes, devices and byte counts as ComfyUI's CPU mode has them (fp32 storage, CPU
# tensors); in GPU mode ComfyUI stores fp16 and the expectations differ (seen on an H200).
cpu_mode_only = pytest.mark.skipif(
    mm.get_torch_device().type != "cpu", reason="expectations written for ComfyUI's CPU mode"
)


def comfy_nodes():
    """ComfyUI's own nodes.py (not ours, which shares the name)."""
    import nodes as comfy_nodes_module

    assert Path(comfy_nodes_module.__file__).parent == Path(os.environ["WAN22_COMFYUI"])
    return comfy_nodes_module


def load_node(model_type="safetensors", safetensors_model=loader.NO_MODEL, gguf_model=loader.NO_MODEL, **kw):
    (model,) = nodes.WANModelLoader().load_model(
        model_type,
        safetensors_model,
        gguf_model,
        kw.pop("wan_version", "auto"),
        kw.pop("model_variant", "auto"),
        kw.pop("fp8_optimization", "disabled"),
        kw.pop("weight_dtype", "auto"),
    )
    assert not kw
    return model


def unet_loader(name, weight_dtype="default"):
    (model,) = comfy_nodes().UNETLoader().load_unet(name, weight_dtype)
    return model


def swap(model, **settings):
    (out,) = nodes.WAN22BlockSwap().apply(model, **{"blocks_to_swap": 2, "prefetch_blocks": 1, **settings})
    return out


qtype_for = mixed_wan_qtypes  # every type the tests cover, where real WAN GGUFs put them


def lora_patches(model, seed=3, rank=4):
    """A LoRA (ComfyUI's format) on every 2-D weight of every block and on a float (BF16) weight."""
    import comfy.weight_adapter as wa

    g = torch.Generator().manual_seed(seed)
    patches = {}
    for key, weight in model.model.named_parameters():  # (state_dict() of ComfyUI-GGUF layers is a fake)
        logical = tuple(getattr(weight, "tensor_shape", weight.shape))
        wanted = key.startswith("diffusion_model.blocks.") or key == "diffusion_model.time_embedding.0.weight"
        if wanted and key.endswith(".weight") and len(logical) == 2:
            up = torch.randn(logical[0], rank, generator=g) * 0.1
            down = torch.randn(rank, logical[1], generator=g) * 0.1
            value = (up, down, None, None, None, None)
            patches[key] = wa.LoRAAdapter(set(), value) if hasattr(wa, "LoRAAdapter") else ("lora", value)
    return patches


def with_lora(model, patches, strength=1.0):
    out = model.clone()
    out.add_patches(patches, strength)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny WAN files: safetensors of several variants, a mixed-type GGUF and its dequantized twin."""
    root = tmp_path_factory.mktemp("wan_files")
    out = {v: write_checkpoint(root, v) for v in ("t2v", "vace", "5b")}
    gguf_path = root / "tiny_wan_t2v.gguf"
    written = write_wan_gguf(gguf_path, checkpoint_state_dict("t2v"), qtype_for)
    assert {T.Q8_0, T.Q4_0, T.Q5_1, T.F16, T.BF16, T.F32} <= set(written.values())
    out["gguf"] = gguf_path
    # The same weights after GGUF rounding, as float32 safetensors: what the GGUF model must compute.
    sd, _ = load_gguf_state_dict(gguf_path)
    dequantized = {
        k: (v.dequantize(torch.float32) if isinstance(v, GGUFWeight) else v.float()).contiguous()
        for k, v in sd.items()
    }
    out["dequantized"] = root / "tiny_wan_t2v_dequantized.safetensors"
    save_file(dequantized, str(out["dequantized"]))
    return out


def place(model_dir: Path, *paths: Path, sub: str = "") -> list[str]:
    """Link files into the model folder; return the names the node lists for them."""
    names = []
    for path in paths:
        target = model_dir / sub / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        names.append(os.path.join(sub, path.name) if sub else path.name)
    return names


# --------------------------------------------------------------------------------------------
# Node definition and folders
# --------------------------------------------------------------------------------------------


def test_node_is_registered_with_the_seed_inputs(model_dir):
    assert nodes.NODE_CLASS_MAPPINGS["WANModelLoader"] is nodes.WANModelLoader
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["WANModelLoader"] == "WAN Model Loader"
    assert nodes.NODE_CLASS_MAPPINGS["wan22BlockSwap"] is nodes.WAN22BlockSwap  # still there
    node = nodes.WANModelLoader
    assert node.CATEGORY == "WAN" and node.RETURN_TYPES == ("MODEL",) and node.DESCRIPTION
    spec = node.INPUT_TYPES()
    assert list(spec) == ["required"]
    assert list(spec["required"]) == SEED_INPUTS
    choices = {k: v[0] for k, v in spec["required"].items()}
    assert choices["model_type"] == ["safetensors", "gguf"]
    assert choices["wan_version"] == ["auto", "2.1", "2.2"]
    assert choices["model_variant"] == ["auto", "t2v", "i2v", "vace", "camera", "s2v", "humo", "animate"]
    assert choices["fp8_optimization"] == ["disabled", "e4m3fn", "e5m2"]
    assert choices["weight_dtype"] == ["auto", "fp16", "bf16", "fp32"]
    # An empty folder still gives valid combos.
    assert choices["safetensors_model"] == [loader.NO_MODEL] and choices["gguf_model"] == [loader.NO_MODEL]
    assert all(v[1].get("tooltip") for v in spec["required"].values())


def test_node_lists_files_of_each_kind_and_leaves_other_folders_alone(model_dir, files, tmp_path):
    table = folder_paths.folder_names_and_paths
    before = {k: (id(v[1]), sorted(v[1])) for k, v in table.items()}
    shared_before = sorted(folder_paths.supported_pt_extensions)
    st = place(model_dir, files["t2v"])
    gg = place(model_dir, files["gguf"], sub="quant")
    (model_dir / "notes.txt").write_text("not a model")
    (model_dir / "old.ckpt").write_bytes(b"pickle")
    spec = nodes.WANModelLoader.INPUT_TYPES()["required"]
    # NO_MODEL stays listed last, so a saved workflow's unused combo ("none") validates with files present.
    assert spec["safetensors_model"][0] == [*st, loader.NO_MODEL]
    assert (
        spec["gguf_model"][0]
        == [*gg, loader.NO_MODEL]
        == [os.path.join("quant", "tiny_wan_t2v.gguf"), "none"]
    )
    # ComfyUI's own extension sets are untouched: .gguf lives in a folder key of our own.
    after = {k: (id(v[1]), sorted(v[1])) for k, v in table.items() if k != loader.GGUF_FOLDER}
    assert after == before
    assert sorted(folder_paths.supported_pt_extensions) == shared_before and ".gguf" not in shared_before
    assert table[loader.GGUF_FOLDER][1] == {".gguf"}
    assert ".gguf" not in table["diffusion_models"][1] and ".gguf" not in table["checkpoints"][1]
    # Folders added to diffusion_models later (extra_model_paths.yaml does this) are searched too.
    extra = tmp_path / "extra_unet"
    extra.mkdir()
    os.link(files["gguf"], extra / "second.gguf")
    folder_paths.add_model_folder_path("unet", str(extra))  # the legacy name maps to diffusion_models
    assert sorted(loader.list_gguf_models()) == sorted([*gg, "second.gguf"])
    assert loader.resolve_model_path("gguf", "second.gguf") == str(extra / "second.gguf")


def test_names_outside_the_folders_and_missing_files_are_refused(model_dir, files, tmp_path):
    place(model_dir, files["t2v"], files["gguf"])
    outside = tmp_path / "outside.safetensors"
    os.link(files["t2v"], outside)  # exists, but not in a model folder
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        with pytest.raises(ValueError, match="resolves outside the diffusion_models folders"):
            load_node("safetensors", name)
    with pytest.raises(
        FileNotFoundError, match=r"safetensors_model 'nope.safetensors' not found in the diffusion"
    ):
        load_node("safetensors", "nope.safetensors")
    with pytest.raises(ValueError, match="model_type is gguf but no gguf_model is selected"):
        load_node("gguf", "tiny_wan_t2v.safetensors", loader.NO_MODEL)
    with pytest.raises(ValueError, match=r"gguf_model 'tiny_wan_t2v.safetensors' is not a .gguf file"):
        load_node("gguf", gguf_model="tiny_wan_t2v.safetensors")
    with pytest.raises(ValueError, match="model_type must be one of safetensors, gguf"):
        load_node("ckpt", "tiny_wan_t2v.safetensors")


# --------------------------------------------------------------------------------------------
# Safetensors: the same model as ComfyUI's UNETLoader
# --------------------------------------------------------------------------------------------


@cpu_mode_only
@pytest.mark.parametrize(
    "fp8, unet_dtype", [("disabled", "default"), ("e4m3fn", "fp8_e4m3fn"), ("e5m2", "fp8_e5m2")]
)
def test_safetensors_equal_unet_loader(model_dir, files, fp8, unet_dtype):
    (name,) = place(model_dir, files["t2v"])
    ours = load_node("safetensors", name, fp8_optimization=fp8)
    theirs = unet_loader(name, unet_dtype)
    assert type(ours) is type(theirs)
    ffn_ours = ours.model.diffusion_model.blocks[0].ffn[0].weight
    ffn_theirs = theirs.model.diffusion_model.blocks[0].ffn[0].weight
    expected = torch.float32 if fp8 == "disabled" else getattr(torch, f"float8_{fp8}")
    assert ffn_ours.dtype == ffn_theirs.dtype == expected
    assert torch.equal(ffn_ours.float(), ffn_theirs.float())
    assert ours.model.manual_cast_dtype == theirs.model.manual_cast_dtype
    assert torch.equal(sample(ours), sample(theirs))


def test_weight_dtype_is_storage_without_fp8_and_compute_with_it(model_dir, files):
    (name,) = place(model_dir, files["t2v"])
    fp16 = load_node("safetensors", name, weight_dtype="fp16")
    assert fp16.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float16
    fp8_bf16 = load_node("safetensors", name, fp8_optimization="e4m3fn", weight_dtype="bf16")
    assert fp8_bf16.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    assert fp8_bf16.object_patches["manual_cast_dtype"] == torch.bfloat16
    # Equal to UNETLoader fp8 followed by ComfyUI's own ModelComputeDtype, and really different from fp32.
    reference = unet_loader(name, "fp8_e4m3fn").clone()
    reference.set_model_compute_dtype(torch.bfloat16)
    out = sample(fp8_bf16)
    assert torch.equal(out, sample(reference))
    assert not torch.equal(out, sample(load_node("safetensors", name, fp8_optimization="e4m3fn")))


def test_version_and_variant_choices_are_checked_against_the_weights(model_dir, files, caplog):
    names = dict(
        zip(("t2v", "vace", "5b"), place(model_dir, files["t2v"], files["vace"], files["5b"]), strict=True)
    )
    with pytest.raises(
        ValueError, match=r"model_variant=t2v does not match tiny_wan_vace.safetensors: .* WAN vace"
    ):
        load_node("safetensors", names["vace"], model_variant="t2v")
    with pytest.raises(
        ValueError, match=r"model_variant=vace does not match tiny_wan_t2v.safetensors: .* WAN t2v"
    ):
        load_node("safetensors", names["t2v"], model_variant="vace")
    with pytest.raises(
        ValueError, match=r"wan_version=2.1 does not match tiny_wan_5b.safetensors: .* WAN 2.2"
    ):
        load_node("safetensors", names["5b"], wan_version="2.1")
    # Matching choices change nothing.
    auto = sample(load_node("safetensors", names["vace"]), "vace")
    explicit = sample(
        load_node("safetensors", names["vace"], wan_version="2.1", model_variant="vace"), "vace"
    )
    assert torch.equal(auto, explicit)
    with caplog.at_level(logging.INFO):
        model = load_node("safetensors", names["5b"], wan_version="2.2", model_variant="t2v")
    assert type(model.model).__name__ == "WAN22"
    assert any("WAN 2.2 TI2V" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.INFO):
        load_node("safetensors", names["t2v"], wan_version="2.2")  # A14B high/low files look like this
    assert any("2.1 14B architecture" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


@cpu_mode_only
def test_gguf_loads_quantized_and_matches_its_dequantized_weights(model_dir, files, caplog):
    gguf_name, deq_name, orig_name = place(model_dir, files["gguf"], files["dequantized"], files["t2v"])
    with caplog.at_level(logging.INFO):
        model = load_node("gguf", gguf_model=gguf_name, fp8_optimization="e4m3fn", weight_dtype="bf16")
    assert any("do not apply to GGUF" in r.getMessage() for r in caplog.records)
    assert type(model) is loader.WanGGUFModelPatcher
    block = model.model.diffusion_model.blocks[1]
    for layer, qtype in ((block.self_attn.q, T.Q8_0), (block.cross_attn.k, T.Q4_0), (block.ffn[2], T.Q5_1)):
        assert type(layer.weight) is GGUFWeight and layer.weight.tensor_type == qtype
        assert layer.weight.tensor_shape == torch.Size([128, layer.weight.tensor_shape[1]])
    # ComfyUI's accounting sees the quantized bytes, not a dequantized size.
    assert model.model_size() < 0.6 * mm.module_size(unet_loader(orig_name).model)
    out = sample(model)
    reference = sample(unet_loader(deq_name))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, sample(unet_loader(orig_name)), atol=1e-3)  # the quantization is real


def test_gguf_with_block_swap_gives_the_same_output_and_the_engine_runs(model_dir, files):
    (name,) = place(model_dir, files["gguf"])
    model = load_node("gguf", gguf_model=name)
    reference = sample(model)
    swapped = swap(model, blocks_to_swap=3)
    assert type(swapped).__name__ == "BlockSwapWanGGUFModelPatcher"
    assert torch.equal(sample(swapped), reference)
    plan = callbacks.plan_of(swapped)
    assert plan.engine.counters.bytes_copied > 0
    assert torch.equal(sample(model), reference)  # the plain model afterwards


@cpu_mode_only
def test_lora_on_gguf_is_applied_unfused_and_equals_block_swap(model_dir, files):
    gguf_name, deq_name = place(model_dir, files["gguf"], files["dequantized"])
    model = load_node("gguf", gguf_model=gguf_name)
    q = model.model.diffusion_model.blocks[0].self_attn.q.weight
    raw_before = q.as_subclass(torch.Tensor).clone()
    plain = sample(model)
    patches = lora_patches(model)
    lora = with_lora(model, patches)
    out = sample(lora)
    assert not torch.allclose(out, plain, atol=1e-3)  # the LoRA changes the output
    # Kept on the weight, not fused into its bytes; cleared when another clone loads.
    assert q.patches and q.patches[0][1] == "diffusion_model.blocks.0.self_attn.q.weight"
    assert torch.equal(q.as_subclass(torch.Tensor), raw_before)
    # The same LoRA on the dequantized weights, fused by ComfyUI, gives the same result.
    deq = unet_loader(deq_name)
    torch.testing.assert_close(out, sample(with_lora(deq, lora_patches(deq))), rtol=1e-4, atol=1e-4)
    assert torch.equal(sample(model), plain)
    assert not q.patches
    # With BlockSwap, whichever comes first.
    torch.testing.assert_close(sample(swap(lora, blocks_to_swap=3)), out, rtol=1e-5, atol=1e-5)
    swapped_then_lora = with_lora(swap(model, blocks_to_swap=3), patches)
    torch.testing.assert_close(sample(swapped_then_lora), out, rtol=1e-5, atol=1e-5)
    assert callbacks.plan_of(swapped_then_lora).engine.counters.bytes_copied > 0
    half = sample(with_lora(model, patches, 0.5))
    assert not torch.allclose(half, out, atol=1e-3) and not torch.allclose(half, plain, atol=1e-3)
    assert torch.equal(sample(model), plain)


@cpu_mode_only
def test_a_gguf_layer_applies_its_lora_once_however_comfyui_attaches_it(model_dir, files):
    """Loaded layers get weight.patches; offloaded (lowvram) ones ComfyUI's LowVramPatch; never both twice."""
    import comfy.lora
    import comfy.model_patcher

    from wan22_blockswap.quant.ops import cast_gguf_bias_weight

    (name,) = place(model_dir, files["gguf"])
    model = load_node("gguf", gguf_model=name)
    key = "diffusion_model.blocks.0.self_attn.q.weight"
    patched = with_lora(model, {key: lora_patches(model)[key]})
    layer = model.model.diffusion_model.blocks[0].self_attn.q
    weight = layer.weight
    expected = comfy.lora.calculate_weight(patched.patches[key], weight.dequantize(torch.float32), key)
    assert not torch.allclose(expected, weight.dequantize(torch.float32), atol=1e-3)

    def effective():
        return cast_gguf_bias_weight(layer, dtype=torch.float32, device=torch.device("cpu"))[0]

    lowvram_patch = comfy.model_patcher.LowVramPatch(key, patched.patches)
    try:
        weight.patches = [(patched.patches[key], key)]
        torch.testing.assert_close(effective(), expected)
        layer.weight_function = [lowvram_patch]
        torch.testing.assert_close(effective(), expected)  # both attached: still applied once
        weight.patches = []
        torch.testing.assert_close(effective(), expected, rtol=1e-5, atol=1e-6)
    finally:
        weight.patches = []
        layer.weight_function = []
    # ComfyUI's own loader with a tiny budget: every layer is offloaded and gets the LowVramPatch...
    cpu = torch.device("cpu")
    x = torch.randn(2, 5, 128)
    reference = torch.nn.functional.linear(x, expected, layer.bias)
    for force_patch_weights in (False, True):
        patched.load(cpu, lowvram_model_memory=1, force_patch_weights=force_patch_weights, full_load=False)
        try:
            assert layer.comfy_cast_weights
            has_function = any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in layer.weight_function)
            # ...or, with force_patch_weights (as ComfyUI-GGUF always does), patches on the weight.
            assert has_function != force_patch_weights and bool(layer.weight.patches) == force_patch_weights
            torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
        finally:
            patched.unpatch_model(cpu)
        assert not layer.weight.patches and not layer.weight_function
    torch.testing.assert_close(
        layer(x), torch.nn.functional.linear(x, weight.dequantize(torch.float32), layer.bias)
    )


def _import_comfyui_gguf():
    spec = importlib.util.spec_from_file_location(
        "ComfyUI-GGUF", COMFY_GGUF / "__init__.py", submodule_search_locations=[str(COMFY_GGUF)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI-GGUF"] = module
    spec.loader.exec_module(module)
    return sys.modules["ComfyUI-GGUF.nodes"]


@pytest.mark.skipif(not COMFY_GGUF.is_dir(), reason=f"ComfyUI-GGUF not found at {COMFY_GGUF}")
def test_comfyui_gguf_models_work_with_block_swap(model_dir, files):
    gguf_nodes = sys.modules.get("ComfyUI-GGUF.nodes") or _import_comfyui_gguf()
    (name,) = place(model_dir, files["gguf"])
    # dequant_dtype float32: its default decodes in float16, ours in float32 (bit-exact to gguf's numpy).
    (city,) = gguf_nodes.UnetLoaderGGUF().load_unet(name, dequant_dtype="float32")
    assert type(city).__name__ == "GGUFModelPatcher"
    reference = sample(city)
    swapped = swap(city, blocks_to_swap=3)
    assert torch.equal(sample(swapped), reference)
    assert callbacks.plan_of(swapped).engine.counters.bytes_copied > 0
    # Its dequantization and ours agree on the same file.
    torch.testing.assert_close(sample(load_node("gguf", gguf_model=name)), reference, rtol=1e-5, atol=1e-5)
    # LoRA through its patcher, with and without BlockSwap.
    patches = lora_patches(city)
    lora_ref = sample(with_lora(city, patches))
    assert not torch.allclose(lora_ref, reference, atol=1e-3)
    torch.testing.assert_close(sample(swap(with_lora(city, patches), blocks_to_swap=3)), lora_ref)


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------


def _refuse_loading(monkeypatch):
    """Proves a bad file is refused before ComfyUI builds anything."""

    def fail(*args, **kwargs):
        raise AssertionError("ComfyUI's loader must not be reached for a bad file")

    monkeypatch.setattr(comfy.sd, "load_diffusion_model", fail)
    monkeypatch.setattr(comfy.sd, "load_diffusion_model_state_dict", fail)


def test_bad_files_get_clear_errors_before_anything_is_built(model_dir, files, monkeypatch):
    data = files["t2v"].read_bytes()
    (model_dir / "truncated.safetensors").write_bytes(data[: len(data) - 1000])
    (model_dir / "tiny_header.safetensors").write_bytes(data[:100])
    (model_dir / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    save_file({"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(model_dir / "sd15.safetensors"))
    sd = checkpoint_state_dict("t2v")
    write_wan_gguf(model_dir / "llama.gguf", sd, qtype_for, arch="llama")
    (model_dir / "empty.gguf").write_bytes(b"")
    gguf_data = files["gguf"].read_bytes()
    (model_dir / "cut.gguf").write_bytes(gguf_data[: len(gguf_data) // 2])
    # A quantization type the dequantizers do not know, on one weight.
    odd = dict(sd)
    weight = odd["blocks.1.ffn.0.weight"]
    raw = torch.zeros(weight.shape[0], weight.shape[1] // 32 * 18, dtype=torch.uint8)  # IQ4_NL: 18 B / 32
    odd["blocks.1.ffn.0.weight"] = GGUFWeight(raw, tensor_type=T.IQ4_NL, tensor_shape=weight.shape)
    write_wan_gguf(model_dir / "iq4.gguf", odd, qtype_for)
    _refuse_loading(monkeypatch)

    with pytest.raises(
        ValueError,
        match=r"truncated\.safetensors is truncated or damaged: its tensors do not cover its \d+ bytes",
    ):
        load_node("safetensors", "truncated.safetensors")
    with pytest.raises(ValueError, match="tiny_header.safetensors is truncated or not a safetensors file"):
        load_node("safetensors", "tiny_header.safetensors")
    with pytest.raises(ValueError, match=r"garbage.safetensors is not a safetensors file \(bad header"):
        load_node("safetensors", "garbage.safetensors")
    with pytest.raises(ValueError, match="sd15.safetensors: not a WAN 2.1/2.2 diffusion model"):
        load_node("safetensors", "sd15.safetensors")
    with pytest.raises(ValueError, match=r"GGUF architecture is 'llama', expected 'wan'"):
        load_node("gguf", gguf_model="llama.gguf")
    with pytest.raises(ValueError, match="empty.gguf is not a readable GGUF file"):
        load_node("gguf", gguf_model="empty.gguf")
    with pytest.raises(ValueError, match="cut.gguf"):
        load_node("gguf", gguf_model="cut.gguf")
    with pytest.raises(
        ValueError, match=r"tensor 'blocks.1.ffn.0.weight' has GGML type IQ4_NL, which is not supp"
    ):
        load_node("gguf", gguf_model="iq4.gguf")
    assert not mm.current_loaded_models


def _gguf_of(sd: dict, path: Path) -> Path:
    write_wan_gguf(path, sd, qtype_for)
    return path


def _write_as(fmt: str, sd: dict, path: Path) -> str:
    """Write `sd` as a file of `fmt` (safetensors or gguf); return its name in the model folder."""
    if fmt == "gguf":
        _gguf_of(sd, path)
    else:
        save_file(sd, str(path))
    return path.name


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_a_file_missing_tensors_is_refused_naming_them_and_the_detection(model_dir, monkeypatch, fmt):
    """ComfyUI itself loads such a file with an "unet missing" warning and samples uninitialised weights."""
    sd = checkpoint_state_dict("t2v")
    gone = ["blocks.2.ffn.0.weight", "blocks.1.self_attn.norm_q.weight", "head.head.bias"]
    damaged = {k: v for k, v in sd.items() if k not in gone}
    damaged["blocks.3.cross_attn.k.weihgt"] = damaged.pop("blocks.3.cross_attn.k.weight")  # a renamed one
    name = _write_as(fmt, damaged, model_dir / f"incomplete.{fmt}")
    _refuse_loading(monkeypatch)
    with pytest.raises(ValueError) as refused:
        load_node(fmt, **{f"{fmt}_model": name})
    message = str(refused.value)
    assert message.startswith(f"{name} is not a complete WAN model: 4 tensors missing: ")
    for key in [*gone, "blocks.3.cross_attn.k.weight"]:
        assert key in message
    assert "Detected WAN 2.1 t2v (4 blocks, dim 128, 16 in / 16 out channels)" in message


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_a_file_with_misshapen_tensors_is_refused_naming_them(model_dir, monkeypatch, fmt):
    sd = checkpoint_state_dict("t2v")
    sd["blocks.0.ffn.2.weight"] = sd["blocks.0.ffn.2.weight"][
        :, :128
    ].contiguous()  # (128, 256) -> (128, 128)
    sd["blocks.1.norm3.bias"] = torch.zeros(64)
    name = _write_as(fmt, sd, model_dir / f"misshapen.{fmt}")
    _refuse_loading(monkeypatch)
    with pytest.raises(ValueError) as refused:
        load_node(fmt, **{f"{fmt}_model": name})
    message = str(refused.value)
    assert message.startswith(f"{name} is not a complete WAN model: 2 tensors with the wrong shape: ")
    assert "blocks.0.ffn.2.weight (128, 128) (expected (128, 256))" in message
    assert "blocks.1.norm3.bias (64,) (expected (128,))" in message
    assert "Detected WAN 2.1 t2v" in message


def test_integer_weights_are_refused_naming_them(model_dir, monkeypatch):
    sd = checkpoint_state_dict("t2v")
    sd["blocks.0.self_attn.q.weight"] = sd["blocks.0.self_attn.q.weight"].view(torch.int32)
    save_file(sd, str(model_dir / "ints.safetensors"))
    _refuse_loading(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"ints.safetensors is not a complete WAN model: 1 tensors not stored as "
        r"floating point: blocks.0.self_attn.q.weight \(I32\)",
    ):
        load_node("safetensors", "ints.safetensors")


def test_errors_from_comfyui_detection_name_the_file(model_dir, monkeypatch):
    """dim 1: ComfyUI's WAN detection divides by dim // 128 (ZeroDivisionError) before building anything."""
    sd = checkpoint_state_dict("t2v")
    sd["head.modulation"] = torch.zeros(1, 2, 1)
    save_file(sd, str(model_dir / "dim1.safetensors"))
    _refuse_loading(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"dim1.safetensors is not a loadable WAN model \(detected: WAN 2.1 t2v "
        r"\(4 blocks, dim 1, .*ZeroDivisionError",
    ):
        load_node("safetensors", "dim1.safetensors")


def test_a_safetensors_header_length_past_the_librarys_limit_is_refused_before_reading(model_dir):
    """A sparse 120 MB file whose header length fits its size but lies."""
    path = model_dir / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write((110_000_000).to_bytes(8, "little"))
        f.truncate(120_000_000)
    with pytest.raises(
        ValueError,
        match=r"sparse.safetensors is truncated or not a safetensors file: it "
        r"announces a 110000000-byte header .* \(at most 100000000 are read\)",
    ):
        load_node("safetensors", "sparse.safetensors")


def test_symlinks_inside_the_model_folders_are_followed(model_dir, files, tmp_path):
    """People keep models on other drives and link them in, as ComfyUI's own loaders allow."""
    elsewhere = tmp_path / "other_drive"
    (elsewhere / "wan").mkdir(parents=True)
    os.link(files["gguf"], elsewhere / "wan" / "linked_dir.gguf")
    (model_dir / "linked.safetensors").symlink_to(files["t2v"])
    (model_dir / "drive").symlink_to(elsewhere / "wan", target_is_directory=True)
    spec = nodes.WANModelLoader.INPUT_TYPES()["required"]
    assert "linked.safetensors" in spec["safetensors_model"][0]
    assert os.path.join("drive", "linked_dir.gguf") in spec["gguf_model"][0]
    assert torch.equal(sample(load_node("safetensors", "linked.safetensors")), sample(load(files["t2v"])))
    load_node("gguf", gguf_model=os.path.join("drive", "linked_dir.gguf"))
    # Names from a prompt still never resolve outside the folders, links or not.
    with pytest.raises(ValueError, match="resolves outside the diffusion_models folders"):
        load_node("gguf", gguf_model="drive/../../other_drive/wan/linked_dir.gguf")


def test_an_fp8_scaled_file_loads_through_the_loader_like_unet_loader(model_dir, tmp_path):
    """ComfyUI's WAN 2.2 fp8 files scale only the layers they quantized; the completeness check must not
    take the scale parameters ComfyUI's layers default for the rest as missing."""
    from .comfy_helpers import write_fp8_scaled_checkpoint

    (name,) = place(model_dir, write_fp8_scaled_checkpoint(tmp_path))
    model = load_node("safetensors", safetensors_model=name)
    assert torch.equal(sample(model), sample(unet_loader(name)))
    assert torch.equal(sample(swap(model, blocks_to_swap=3)), sample(unet_loader(name)))
