"""The WAN BlockSwap Model Loader (combined loader) inside a real ComfyUI: every tensor read from the file
once into its final home, and a model that behaves exactly like WAN Model Loader -> WAN 2.2 BlockSwap."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys

import comfy.model_management as mm
import pytest
import torch
from safetensors.torch import load_file, save_file

from wan22_blockswap import callbacks, loader, looper, nodes
from wan22_blockswap.bench.gguf_writer import write_wan_gguf
from wan22_blockswap.block_manager import _leaves
from wan22_blockswap.config import SwapConfig

from .comfy_helpers import checkpoint_state_dict, write_checkpoint, write_fp8_scaled_checkpoint
from .comfy_helpers import sample as _sample
from .host_loader import SEED_INPUTS, lora_patches, place, qtype_for, with_lora
from .lowvram import DEVICE, SimulatedCard, loaded_weight_memory


def sample(*args, **kwargs):
    with torch.no_grad():  # as ComfyUI samples (fp8 LoRA patching writes with out=)
        return _sample(*args, **kwargs)


SWAP_INPUTS = [
    "blocks_to_swap",
    "offload_txt_emb",
    "offload_img_emb",
    "use_non_blocking",
    "vace_blocks_to_swap",
    "prefetch_blocks",
    "block_swap_debug",
]
SETTINGS = {"blocks_to_swap": 2, "prefetch_blocks": 1}

# name -> (file, model_type, fp8_optimization, weight_dtype)
FORMATS = {
    "fp32": ("fp32", "safetensors", "disabled", "auto"),
    "bf16_file": ("bf16", "safetensors", "disabled", "auto"),
    "bf16": ("fp32", "safetensors", "disabled", "bf16"),
    "fp16": ("fp32", "safetensors", "disabled", "fp16"),
    "fp8_e4m3fn": ("fp32", "safetensors", "float8_e4m3fn", "auto"),
    "fp8_e5m2_bf16": ("fp32", "safetensors", "float8_e5m2", "bf16"),
    "fp8_scaled": ("fp8_scaled", "safetensors", "disabled", "auto"),
    "gguf": ("gguf", "gguf", "disabled", "auto"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("combined")
    fp32 = write_checkpoint(root, "t2v", num_layers=4)
    bf16 = root / "tiny_wan_t2v_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(fp32)).items()}, str(bf16))
    gguf_path = root / "tiny_wan_t2v.gguf"
    write_wan_gguf(gguf_path, checkpoint_state_dict("t2v"), qtype_for)
    vace = write_checkpoint(root, "vace", num_layers=4)
    return {
        "fp32": fp32,
        "bf16": bf16,
        "fp8_scaled": write_fp8_scaled_checkpoint(root),
        "gguf": gguf_path,
        "vace": vace,
    }


def fp8_name(choice: str) -> str:
    return choice.replace("float8_", "") if choice != "disabled" else choice


def node_args(fmt: str, names: dict[str, str]) -> dict:
    file_key, model_type, fp8, weight_dtype = FORMATS[fmt]
    return {
        "model_type": model_type,
        "safetensors_model": names[file_key] if model_type == "safetensors" else loader.NO_MODEL,
        "gguf_model": names[file_key] if model_type == "gguf" else loader.NO_MODEL,
        "wan_version": "auto",
        "model_variant": "auto",
        "fp8_optimization": fp8_name(fp8),
        "weight_dtype": weight_dtype,
    }


def combined(args: dict, **settings):
    (model,) = nodes.WAN22BlockSwapLoader().load_model(**args, **{**SETTINGS, **settings})
    return model


def separate(args: dict, **settings):
    (model,) = nodes.WANModelLoader().load_model(**args)
    (swapped,) = nodes.WAN22BlockSwap().apply(model, **{**SETTINGS, **settings})
    return swapped


@pytest.fixture
def names(model_dir, files):
    keys = list(files)
    return dict(zip(keys, place(model_dir, *files.values()), strict=True))


def test_node_is_registered_with_the_loader_inputs_then_the_swap_settings():
    assert nodes.NODE_CLASS_MAPPINGS["WAN22BlockSwapLoader"] is nodes.WAN22BlockSwapLoader
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["WAN22BlockSwapLoader"] == "WAN BlockSwap Model Loader"
    assert nodes.WAN22BlockSwapLoader.CATEGORY == "ComfyUI_Wan22Blockswap"
    spec = nodes.WAN22BlockSwapLoader.INPUT_TYPES()
    order = [*spec["required"], *spec.get("optional", {})]
    assert order == SEED_INPUTS + SWAP_INPUTS + [
        "override_dynamic_vram",
        "auto_blocks_to_swap",
        "host_memory",
    ]
    loader_spec = nodes.WANModelLoader.INPUT_TYPES()["required"]
    for name in SEED_INPUTS:
        assert spec["required"][name] == loader_spec[name]
    assert spec["required"]["blocks_to_swap"][1]["default"] == 20


def _tensor_in(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    return all(start <= leaf.data_ptr() < end for leaf in _leaves(t))


class SpyHeldBack(loader.HeldBackCopies):
    """Records which parameters the loader filled itself (every held-back copy nobody else took)."""

    made: list[torch.Tensor] = []
    held: set[int] = set()

    def sources(self):
        out = super().sources()
        SpyHeldBack.held |= set(out)
        return out

    def complete(self, taken=frozenset(), on_copy=None, only=None):
        def record(dst):
            SpyHeldBack.made.append(dst)
            if on_copy is not None:
                on_copy(dst)

        return super().complete(taken, on_copy=record, only=only)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_after_the_node_every_swapped_tensor_is_in_its_slab_read_from_the_file_once(fmt, names, monkeypatch):
    SpyHeldBack.made, SpyHeldBack.held = [], set()
    monkeypatch.setattr(loader, "HeldBackCopies", SpyHeldBack)
    settings = {"blocks_to_swap": 3, "offload_txt_emb": True}
    card = SimulatedCard(total=2**30)
    with card.active():
        reference = separate(node_args(fmt, names), **settings)
        mm.load_models_gpu([reference])
        expected = (loaded_weight_memory(reference), card.weights_on_card(reference))
        del reference
        mm.unload_all_models()
        model = combined(node_args(fmt, names), **settings)
        # Nothing of the model on the card, and no resident weight read, until ComfyUI's first load.
        assert (loaded_weight_memory(model), card.weights_on_card(model), SpyHeldBack.made) == (0, 0, [])
        mm.load_models_gpu([model])
        # ComfyUI placed the resident weights, as it places them for the two nodes; no swapped block went to
        # the "GPU" (ComfyUI's own figure differs from the bytes on the card for fp8_scaled in both paths)
        assert (loaded_weight_memory(model), card.weights_on_card(model)) == expected
        assert expected[1] > 0 and card.slots_on_card() == 0
        for unit in callbacks.plan_of(model).engine.swapped_units:
            assert all(card.ledger.get((s.owner, s.attr)) != DEVICE for s in unit.layout)
        # (checked while the card is active: its end unloads the model, and ComfyUI unloading a model moves
        # fp8_scaled wrapper tensors into copies of their own until the next load parks them again)
        engine = callbacks.plan_of(model).engine
        units = engine.swapped_units
        assert [u.name for u in units] == ["text_embedding", "blocks.1", "blocks.2", "blocks.3"]
        swapped_ids, not_held = set(), []
        for unit in units:
            assert unit.slab is not None and unit.slab.device.type == "cpu"
            for _owner, attr, _, t in unit.tensors():
                assert _tensor_in(t, unit.slab), unit.name
                assert t.device.type == "cpu"
                swapped_ids.add(id(t))
                if type(t) in (torch.Tensor, torch.nn.Parameter) and id(t) not in SpyHeldBack.held:
                    not_held.append(attr)
        # Each slab built once; every plain swapped tensor filled from the file straight into it, never into
        # the parameter ComfyUI allocated (GGUF and fp8_scaled weights are views of the file until then).
        assert engine.counters.slabs_built == len(units)
        assert engine.counters.slab_bytes_built == sum(u.nbytes for u in units)
        assert engine.counters.slab_tensors_from_sources == len(swapped_ids & SpyHeldBack.held) > 0
        # Plain tensors ComfyUI did not copy at all: only with fp8_scaled, whose mixed-precision layers (0.8.1+)
        # take their float weights and scales as views of the file (the slab build reads them from there).
        assert fmt == "fp8_scaled" or not not_held, not_held
        assert not swapped_ids & {id(t) for t in SpyHeldBack.made}
        assert SpyHeldBack.made  # the resident weights were filled by the loader, as ComfyUI fills them
        # Every filled parameter is the model's own (ComfyUI 0.8.1+ replaces some fp8_scaled layers' bias
        # Parameter objects when it loads them: the loader fills the replacement, not the dropped one).
        resident = {id(p) for p in model.model.diffusion_model.parameters()} - swapped_ids
        assert {id(t) for t in SpyHeldBack.made} <= resident


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_outputs_equal_wan_model_loader_then_blockswap(fmt, lora, names):
    args = node_args(fmt, names)
    outputs = []
    for build in (separate, combined):
        model = build(args)
        if lora:
            model = with_lora(model, lora_patches(model))
        first = sample(model, steps=2)
        assert torch.equal(sample(model, steps=2), first)  # a repeated run
        assert callbacks.plan_of(model).engine.counters.bytes_copied > 0
        outputs.append(first)
        del model
        mm.unload_all_models()
    assert torch.equal(outputs[1], outputs[0])


@pytest.mark.parametrize("fmt", ["fp32", "fp8_scaled", "gguf"])
def test_on_a_small_card_the_memory_manager_sees_the_same_as_with_the_two_nodes(fmt, names):
    """ComfyUI's accounting and the tensors' devices, as on a card that holds half the model."""
    args = node_args(fmt, names)
    results = []
    for build in (separate, combined):
        card = SimulatedCard(total=0)
        with card.active():
            model = build(args, prefetch_blocks=1, blocks_to_swap=2)
            size = sum(
                t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values()
            )
            card.total = size // 2
            out = sample(model, steps=2)
            loaded = loaded_weight_memory(model)
            assert loaded == card.weights_on_card(model)
            assert card.slots_on_card() == 0
            for unit in callbacks.plan_of(model).engine.swapped_units:
                assert all(card.ledger.get((s.owner, s.attr)) != DEVICE for s in unit.layout)
            results.append((out, loaded, model.model_size()))
            del model
            mm.unload_all_models()
    assert torch.equal(results[1][0], results[0][0])
    assert results[1][1:] == results[0][1:]


def test_clones_a_vace_model_and_the_looper_nodes_behave_as_with_the_two_nodes(names):
    args = node_args("fp32", names)
    vace_args = {**args, "safetensors_model": names["vace"]}
    for key, a in (("t2v", args), ("vace", vace_args)):
        ref, new = separate(a, vace_blocks_to_swap=1), combined(a, vace_blocks_to_swap=1)
        variant = "t2v"
        assert torch.equal(sample(new.clone(), variant, steps=2), sample(ref.clone(), variant, steps=2)), key
    # Looper Models on two combined-loader outputs: the same as on two WAN Model Loader outputs.
    high_ref, low_ref = looper.swap_pair(separate(args), separate(args), SwapConfig(blocks_to_swap=3))
    high, low = looper.swap_pair(combined(args), combined(args), SwapConfig(blocks_to_swap=3))
    for a, b in ((high, high_ref), (low, low_ref)):
        assert torch.equal(sample(a, steps=2), sample(b, steps=2))


def test_cleanup_leaves_no_hooks_and_dropping_the_model_frees_its_slabs(names):
    import gc
    import weakref

    model = combined(node_args("fp32", names))
    sample(model, steps=1)
    module = model.model.diffusion_model
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())
    slabs = [weakref.ref(u.slab) for u in callbacks.plan_of(model).engine.swapped_units]
    del model, module
    mm.unload_all_models()
    gc.collect()
    assert all(s() is None for s in slabs)


def test_bad_settings_are_refused_before_the_file_is_read(names, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("the file was read")

    monkeypatch.setattr(loader, "resolve_model_path", never)
    args = node_args("fp32", names)
    for name, value, pattern in (
        ("blocks_to_swap", 65, r"blocks_to_swap must be between 0 and 64"),
        ("prefetch_blocks", -1, r"prefetch_blocks must be between 0 and 8"),
        ("vace_blocks_to_swap", 33, r"vace_blocks_to_swap must be between 0 and 32"),
        ("use_non_blocking", "yes", r"use_non_blocking must be true or false"),
    ):
        with pytest.raises(ValueError, match=pattern):
            combined(args, **{name: value})


def test_bad_files_and_choices_are_refused_as_the_loader_refuses_them(names, model_dir, tmp_path):
    args = node_args("fp32", names)
    cases = [
        {**args, "safetensors_model": loader.NO_MODEL},
        {**args, "safetensors_model": "../outside.safetensors"},
        {**args, "safetensors_model": "missing.safetensors"},
        {**args, "model_variant": "i2v"},
        {**args, "fp8_optimization": "fp4"},
        {**args, "model_type": "onnx"},
    ]
    damaged = model_dir / "damaged.safetensors"
    damaged.write_bytes(names_bytes := (model_dir / names["fp32"]).read_bytes()[: -(1 << 12)])
    assert names_bytes
    cases.append({**args, "safetensors_model": "damaged.safetensors"})
    for case in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as separate_error:
            nodes.WANModelLoader().load_model(**case)
        with pytest.raises(type(separate_error.value)) as combined_error:
            combined(case)
        assert str(combined_error.value) == str(separate_error.value)


def test_one_log_line_gives_the_bytes_read_into_the_slabs_and_what_is_read_at_the_first_load(names, caplog):
    with caplog.at_level(logging.INFO):
        model = combined(node_args("fp32", names), blocks_to_swap=3)
    units = callbacks.plan_of(model).engine.swapped_units
    lines = [r.getMessage() for r in caplog.records if "WAN BlockSwap Model Loader" in r.getMessage()]
    assert len(lines) == 1, lines
    slab = sum(u.nbytes for u in units)
    others = len(model.model.diffusion_model.state_dict()) - sum(1 for u in units for _ in u.tensors())
    from wan22_blockswap.utils import format_bytes

    assert f"{format_bytes(slab)} read into host slabs of 3 swapped units" in lines[0]
    assert f"(0.0 MiB pinned, {format_bytes(slab)} pageable)" in lines[0]
    assert f"the other {others} weights are read from the file when ComfyUI first loads the model" in lines[0]


def test_progress_bars_count_every_tensor_read_from_the_file(names, monkeypatch):
    import comfy.utils

    bars = []

    class RecordingBar:
        def __init__(self, total, *args, **kwargs):
            self.total, self.done = total, 0
            bars.append(self)

        def update(self, value):
            self.done += value

        def update_absolute(self, value, total=None, preview=None):
            self.done = value

    monkeypatch.setattr(comfy.utils, "ProgressBar", RecordingBar)
    model = combined(node_args("fp32", names), blocks_to_swap=3)
    slabs = sum(1 for u in callbacks.plan_of(model).engine.swapped_units for _ in u.tensors())
    (node,) = [b for b in bars if b.total == slabs]  # the node: the swapped blocks, into their slabs
    assert node.done == node.total
    del bars[:]
    mm.load_models_gpu([model])  # the first load: the other weights, where ComfyUI put them
    read = len(model.model.diffusion_model.state_dict())  # every tensor of the file: slabs and the rest
    assert sum(b.total for b in bars) == read - slabs and all(b.done == b.total for b in bars)


@contextlib.contextmanager
def dynamic_vram_on():
    """ComfyUI's dynamic VRAM switched on as its main.py switches it on an Nvidia GPU (0.16+): comfy-aimdo's
    library loaded (`control.init`, which loads on a CPU machine too), the dynamic patcher made the default and
    `aimdo_enabled` set, so its layers load lazily and safetensors files are read through aimdo's mapping. (No
    model is sampled through the dynamic patcher here: the combined loader with override_dynamic_vram builds a
    classic one.)"""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM")
    import comfy.memory_management
    import comfy_aimdo.control

    assert comfy_aimdo.control.init()
    mapping = sys.modules.get("comfy_aimdo.model_mmap")
    if (
        mapping is not None and mapping.lib is None
    ):  # imported before the library was loaded (main.py loads it first)
        importlib.reload(mapping)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcherDynamic)
        mp.setattr(comfy.memory_management, "aimdo_enabled", True)
        yield


@pytest.mark.parametrize("fmt", ["bf16", "fp8_scaled", "gguf"])
def test_with_dynamic_vram_on_the_swapped_blocks_are_still_read_from_the_file_into_their_slabs_only(
    fmt, names, monkeypatch
):
    """0.16+ with comfy-aimdo: its layers take their weights as `Parameter(file_tensor.clone())`, not by a copy
    into an allocated parameter; those reads are held back too."""
    SpyHeldBack.made, SpyHeldBack.held = [], set()
    monkeypatch.setattr(loader, "HeldBackCopies", SpyHeldBack)
    with dynamic_vram_on():
        model = combined(node_args(fmt, names), blocks_to_swap=3, override_dynamic_vram=True)
        units = callbacks.plan_of(model).engine.swapped_units
        plain = [t for u in units for *_, t in u.tensors() if type(t) in (torch.Tensor, torch.nn.Parameter)]
        held = sum(1 for t in plain if id(t) in SpyHeldBack.held)
        assert held == len(plain) > 0  # every plain swapped tensor read from the file into its slab
        assert callbacks.plan_of(model).engine.counters.slab_tensors_from_sources == len(plain)
        swapped_ids = {id(t) for t in plain}
        resident = [t for t in model.model.diffusion_model.parameters() if id(t) not in swapped_ids]
        if fmt != "fp8_scaled":  # (its mixed-precision layers take some as views of the file: nothing read)
            assert {id(t) for t in resident if type(t) is torch.nn.Parameter} <= SpyHeldBack.held
        out = sample(model, steps=2)
        del model
        mm.unload_all_models()
        reference = separate(node_args(fmt, names), blocks_to_swap=3, override_dynamic_vram=True)
        assert torch.equal(out, sample(reference, steps=2))


@pytest.mark.parametrize("fmt", ["bf16", "fp8_scaled", "gguf"])
def test_resident_weights_reach_the_card_once_at_the_first_sampling_even_with_a_lora_in_between(fmt, names):
    """The node places nothing: a LoRA node downstream (a new weight-patch identity) would otherwise make
    ComfyUI move the weights the node loaded back to RAM and to the card again at the first sampling."""
    args = node_args(fmt, names)
    outputs = []
    for build in (separate, combined):
        card = SimulatedCard(total=2**40)
        with card.active():
            model = build(args)
            if build is combined:
                assert card.weights_on_card() == 0 and not card.arrivals  # nothing of the model on the card
            lora = with_lora(model, lora_patches(model))
            outputs.append(sample(lora, steps=2))
            if build is combined:
                units = callbacks.plan_of(lora).engine.swapped_units
                swapped = {(o, a) for u in units for o, a, _, _ in u.tensors()}
                resident = [
                    (m, name)
                    for m in lora.model.diffusion_model.modules()
                    for name, t in [*m._parameters.items(), *m._buffers.items()]
                    if t is not None and (m, name) not in swapped
                ]
                assert resident and {card.arrivals[key] for key in resident} == {1}
                assert not swapped & set(card.arrivals)
            del model, lora
    assert torch.equal(outputs[1], outputs[0])
