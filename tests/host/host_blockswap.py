"""The WAN 2.2 BlockSwap node inside a real ComfyUI (CPU mode): loading, sampling, clones, LoRA."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.model_patcher
import pytest
import torch

from wan22_blockswap import callbacks, nodes
from wan22_blockswap.config import SwapConfig

from .comfy_helpers import count_forwards, expected_bytes, load, plan, sample, write_checkpoint


def swap(model, **settings):
    (out,) = nodes.WAN22BlockSwap().apply(model, **{"blocks_to_swap": 2, **settings})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        v: write_checkpoint(root, v) for v in ("t2v", "i2v", "vace", "5b", "camera", "s2v", "humo", "animate")
    }


def test_node_is_registered_under_its_own_id():
    assert "wanBlockSwap" not in nodes.NODE_CLASS_MAPPINGS
    assert nodes.NODE_CLASS_MAPPINGS["wan22BlockSwap"] is nodes.WAN22BlockSwap
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["wan22BlockSwap"] == "WAN 2.2 BlockSwap"
    assert not getattr(nodes.WAN22BlockSwap, "DEPRECATED", False)
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(nodes.NODE_CLASS_MAPPINGS)
    spec = nodes.WAN22BlockSwap.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "blocks_to_swap", "offload_txt_emb", "offload_img_emb"]
    assert list(spec["optional"])[:4] == [
        "use_non_blocking",
        "vace_blocks_to_swap",
        "prefetch_blocks",
        "block_swap_debug",
    ]
    defaults = {
        k: v[1]["default"]
        for part in spec.values()
        for k, v in part.items()
        if len(v) > 1 and "default" in v[1]
    }
    assert defaults == {
        "blocks_to_swap": 20,
        "offload_txt_emb": False,
        "offload_img_emb": False,
        "use_non_blocking": False,
        "vace_blocks_to_swap": 0,
        "prefetch_blocks": 0,
        "block_swap_debug": False,
        "override_dynamic_vram": False,
        "auto_blocks_to_swap": False,
        "host_memory": "auto",
    }
    assert all(v[1].get("tooltip") for part in spec.values() for v in part.values())
    assert nodes.WAN22BlockSwap.CATEGORY == "ComfyUI_Wan22Blockswap"


def test_old_id_is_a_deprecated_alias_with_the_same_behaviour(checkpoints):
    """Workflows saved with the earlier id `WAN22BlockSwap` still load and sample the same."""
    old = nodes.NODE_CLASS_MAPPINGS["WAN22BlockSwap"]
    assert old is not nodes.WAN22BlockSwap and issubclass(old, nodes.WAN22BlockSwap)
    assert old.DEPRECATED is True
    assert "deprecated" in nodes.NODE_DISPLAY_NAME_MAPPINGS["WAN22BlockSwap"].lower()
    assert old.INPUT_TYPES() == nodes.WAN22BlockSwap.INPUT_TYPES()
    assert (old.CATEGORY, old.RETURN_TYPES, old.RETURN_NAMES, old.FUNCTION) == (
        nodes.WAN22BlockSwap.CATEGORY,
        nodes.WAN22BlockSwap.RETURN_TYPES,
        nodes.WAN22BlockSwap.RETURN_NAMES,
        nodes.WAN22BlockSwap.FUNCTION,
    )
    model = load(checkpoints["t2v"])
    (via_old,) = old().apply(model, blocks_to_swap=2, prefetch_blocks=1)
    (via_new,) = nodes.WAN22BlockSwap().apply(model, blocks_to_swap=2, prefetch_blocks=1)
    torch.testing.assert_close(sample(via_old), sample(via_new), rtol=0, atol=0)


@pytest.mark.parametrize(
    "variant, blocks_to_swap, prefetch",
    [
        ("t2v", 1, 0),
        ("t2v", 3, 1),
        ("t2v", 4, 2),
        ("i2v", 4, 1),
        ("vace", 3, 1),
        ("5b", 4, 0),
        ("camera", 4, 1),
        ("s2v", 2, 1),
        ("humo", 3, 1),
        ("animate", 5, 1),
    ],
)
def test_swapped_output_equals_unswapped_and_engine_ran(checkpoints, variant, blocks_to_swap, prefetch):
    base = load(checkpoints[variant])
    reference = sample(base, variant)
    swapped = swap(
        base,
        blocks_to_swap=blocks_to_swap,
        prefetch_blocks=prefetch,
        offload_txt_emb=True,
        offload_img_emb=True,
        use_non_blocking=True,
    )
    calls = count_forwards(swapped)
    p = plan(swapped)
    out = sample(swapped, variant)
    assert torch.equal(out, reference)
    assert calls and p.engine.counters.passes == len(calls)
    assert p.engine.counters.bytes_copied == expected_bytes(p, len(calls))
    assert p.engine.counters.misses == (p.engine.counters.copies if prefetch == 0 else 0)
    assert not p.engine.is_attached  # hooks removed after the run
    for unit in p.engine.swapped_units:
        assert not unit.module._forward_pre_hooks and not unit.module._forward_hooks


def test_three_runs_and_an_unswapped_clone_in_between(checkpoints):
    base = load(checkpoints["t2v"])
    reference = sample(base)
    other_reference = sample(base, seed=5)
    swapped = swap(base, blocks_to_swap=3, prefetch_blocks=1)
    p = plan(swapped)
    slabs = None
    for i in range(3):
        p.engine.counters.reset()
        assert torch.equal(sample(swapped), reference), f"run {i}"
        assert p.engine.counters.bytes_copied > 0
        current = [u.slab.data_ptr() for u in p.engine.swapped_units]
        assert slabs in (None, current)  # slabs are built once, not per run
        slabs = current
        if i == 1:  # the plain model runs in between, on the same nn.Module
            assert torch.equal(sample(base, seed=5), other_reference)
    assert torch.equal(sample(base), reference)


def test_input_model_is_left_as_it_was(checkpoints):
    base = load(checkpoints["t2v"])
    callbacks_before = {k: dict(v) for k, v in base.callbacks.items()}
    swapped = swap(base)
    assert type(base) is comfy.model_patcher.ModelPatcher
    assert callbacks.plan_of(base) is None
    assert {k: dict(v) for k, v in base.callbacks.items()} == callbacks_before
    assert isinstance(swapped, comfy.model_patcher.ModelPatcher) and swapped is not base
    assert swapped.model is base.model


def test_swapped_blocks_are_never_loaded_and_accounting_is_true(checkpoints):
    base = load(checkpoints["t2v"])
    swapped = swap(base, blocks_to_swap=3, prefetch_blocks=1)
    p = plan(swapped)
    total = mm.module_size(base.model)
    assert swapped.model_size() == total - p.swapped_bytes + p.slot_bytes
    mm.load_models_gpu([swapped])
    entries = swapped._load_list()
    assert not {id(e[-2]) for e in entries} & p.swapped_module_ids
    listed_ids = {id(e[-2]) for e in entries}
    listed = sum(mm.module_size(e[-2]) for e in entries)
    # ComfyUI's list never holds non-leaf parameters (a block's modulation) or buffer-only modules.
    unlisted = sum(
        t.nbytes
        for m in base.model.modules()
        if id(m) not in listed_ids and id(m) not in p.swapped_module_ids
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    )
    assert unlisted < 0.01 * total
    assert listed + p.swapped_bytes + unlisted == total
    # What ComfyUI believes is loaded = every listed module (there is room for all), and the diffusion model's
    # unlisted resident weights, placed with them (see host_placement.py). The slots exist only during a run,
    # so they are not counted as loaded (they were, until the fix of finding 4 in host_lowvram.py: the second
    # sampling call then got one slot set too much budget).
    placed = sum(
        t.nbytes
        for m in base.model.diffusion_model.modules()
        if id(m) not in listed_ids and id(m) not in p.swapped_module_ids
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    )
    assert 0 < placed <= unlisted
    assert swapped.loaded_size() == listed + placed
    for unit in p.engine.swapped_units:
        lo = unit.slab.data_ptr()
        assert all(lo <= t.data_ptr() < lo + unit.slab.numel() for *_, t in unit.tensors()), unit.name
    # A clone of the swapped model keeps the class and the size bookkeeping.
    clone = swapped.clone()
    assert type(clone) is type(swapped) and clone.model_size() == swapped.model_size()


def test_blocks_to_swap_beyond_the_model_is_clamped_with_a_warning(checkpoints, caplog):
    base = load(checkpoints["t2v"])
    with caplog.at_level(logging.WARNING):
        swapped = swap(base, blocks_to_swap=40)
    assert plan(swapped).config.blocks_to_swap == 4
    assert any("blocks_to_swap=40 but the model has 4 blocks" in r.getMessage() for r in caplog.records)
    assert torch.equal(sample(swapped), sample(base))


def test_bad_settings_and_non_wan_models_get_clear_errors(checkpoints):
    base = load(checkpoints["t2v"])
    with pytest.raises(ValueError, match=r"prefetch_blocks must be between 0 and 8 \(got 9\)"):
        swap(base, prefetch_blocks=9)
    with pytest.raises(ValueError, match=r"blocks_to_swap must be an integer between 0 and 64"):
        swap(base, blocks_to_swap="20")

    class NotWan(torch.nn.Module):
        pass

    fake = comfy.model_patcher.ModelPatcher(
        torch.nn.Module(), mm.get_torch_device(), mm.unet_offload_device()
    )
    fake.model.diffusion_model = NotWan()
    with pytest.raises(ValueError, match="needs a WAN 2.1/2.2 diffusion model.*got NotWan"):
        swap(fake)
    assert callbacks.plan_of(base) is None and torch.isfinite(sample(base)).all()


def _lora_patches(model, strength=1.0, seed=3, rank=4):
    """A LoRA on every linear weight of every block (swapped and resident), in ComfyUI's format."""
    import comfy.weight_adapter as wa

    g = torch.Generator().manual_seed(seed)
    patches = {}
    for key, weight in model.model.state_dict().items():
        if key.startswith("diffusion_model.blocks.") and key.endswith(".weight") and weight.ndim == 2:
            up = torch.randn(weight.shape[0], rank, generator=g) * 0.1
            down = torch.randn(rank, weight.shape[1], generator=g) * 0.1
            patches[key] = (
                wa.LoRAAdapter(set(), (up, down, None, None, None, None))
                if hasattr(wa, "LoRAAdapter")
                else ("lora", (up, down, None, None, None, None))
            )
    return patches


@pytest.mark.parametrize("order", ["lora_then_swap", "swap_then_lora"])
def test_lora_gives_the_same_output_with_and_without_block_swap(checkpoints, order):
    base = load(checkpoints["t2v"])
    patches = _lora_patches(base)
    with_lora = base.clone()
    with_lora.add_patches(patches, 1.0)
    reference = sample(with_lora)
    if order == "lora_then_swap":
        swapped = swap(with_lora, blocks_to_swap=3, prefetch_blocks=1)
    else:
        swapped = swap(base, blocks_to_swap=3, prefetch_blocks=1).clone()
        swapped.add_patches(patches, 1.0)
    # On a GPU ComfyUI fuses LoRA into fully loaded weights in fp16 (lora_compute_dtype), while its
    # per-forward patch - which swapped layers use, like its own offloaded layers - computes in the
    # weight's dtype; on the CPU both are fp32. Measured on an H200: max difference 0.02.
    tol = 1e-4 if mm.get_torch_device().type == "cpu" else 5e-2
    torch.testing.assert_close(sample(swapped), reference, rtol=tol, atol=tol)
    assert not torch.allclose(sample(base), reference, atol=1e-3)  # the LoRA really changes the output
    # Strength changes between runs take effect on swapped blocks too.
    weaker = swapped.clone()
    weaker.patches = {}
    weaker.add_patches(patches, 0.3)
    half = base.clone()
    half.add_patches(patches, 0.3)
    torch.testing.assert_close(sample(weaker), sample(half), rtol=tol, atol=tol)
    # And the plain model is untouched by all this.
    torch.testing.assert_close(sample(base), sample(load(checkpoints["t2v"])))


def test_patch_on_a_bare_parameter_behaves_as_in_comfyui(checkpoints):
    """ComfyUI's loader leaves patches on non-leaf parameters (modulation) unapplied; so do we."""
    base = load(checkpoints["t2v"])
    delta = torch.randn(base.model.diffusion_model.blocks[3].modulation.shape) * 0.05
    with_patch = base.clone()
    with_patch.add_patches({"diffusion_model.blocks.3.modulation": ("diff", (delta,))}, 1.0)
    reference = sample(with_patch)
    swapped = swap(with_patch, blocks_to_swap=2, prefetch_blocks=1)
    torch.testing.assert_close(sample(swapped), reference)


def test_an_interrupted_run_leaves_everything_clean(checkpoints):
    base = load(checkpoints["t2v"])
    reference = sample(base)
    swapped = swap(base, blocks_to_swap=3, prefetch_blocks=1)
    p = plan(swapped)

    def interrupt(step, *args):
        if step == 1:
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()

    with pytest.raises(mm.InterruptProcessingException):
        sample(swapped, callback=interrupt)
    assert not p.engine.is_attached
    for unit in p.engine.swapped_units:
        assert not unit.module._forward_pre_hooks and not unit.module._forward_hooks
        lo = unit.slab.data_ptr()
        assert all(lo <= t.data_ptr() < lo + unit.slab.numel() for *_, t in unit.tensors())
    assert torch.equal(sample(swapped), reference)
    assert torch.equal(sample(base), reference)


def test_dynamic_vram_default_defers_and_opt_in_takes_over(caplog):
    """ComfyUI 0.16+ dynamic patchers: decided by feature detection (the CPU host runs the legacy path)."""

    class DynamicPatcher:
        model = None

        def __init__(self):
            self.cloned_with = None

        def is_dynamic(self):
            return True

        def clone(self, disable_dynamic=False):
            self.cloned_with = disable_dynamic
            raise RuntimeError("reloaded without dynamic VRAM")

    dynamic = DynamicPatcher()
    with caplog.at_level(logging.INFO):
        assert callbacks.apply_block_swap(dynamic, SwapConfig()) is dynamic
    assert any(
        "dynamic VRAM" in r.getMessage() and "leaving the model" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(RuntimeError, match="reloaded without dynamic VRAM"):
        callbacks.apply_block_swap(dynamic, SwapConfig(override_dynamic_vram=True))
    assert dynamic.cloned_with is True


def test_fp8_weights_give_the_same_output_as_unswapped(checkpoints):
    base = load(checkpoints["t2v"], dtype=torch.float8_e4m3fn)
    assert base.model.diffusion_model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    reference = sample(base)
    swapped = swap(base, blocks_to_swap=4, prefetch_blocks=1)
    assert torch.equal(sample(swapped), reference)
    assert plan(swapped).engine.counters.bytes_copied > 0


# -- the setups users run (2/2): device placement, pinned memory, RAM --------------------------------


def test_a_lora_strength_change_reuses_the_host_copies(checkpoints):
    """LoraLoader re-run with another strength -> a new clone -> the BlockSwap node runs again: its plan
    takes the first plan's slabs over instead of copying the swapped blocks into RAM again."""
    base = load(checkpoints["t2v"])
    patches = _lora_patches(base)
    strong, weak = base.clone(), base.clone()
    strong.add_patches(patches, 1.0)
    weak.add_patches(patches, 0.3)
    references = [sample(strong), sample(weak)]
    swapped = [swap(m, blocks_to_swap=3, prefetch_blocks=1) for m in (strong, weak)]
    tol = 1e-4 if mm.get_torch_device().type == "cpu" else 5e-2
    for _ in range(2):  # strong, weak, strong, weak: the module changes hands three times
        for model, reference in zip(swapped, references, strict=True):
            torch.testing.assert_close(sample(model), reference, rtol=tol, atol=tol)
    built = sum(plan(m).engine.counters.slab_bytes_built for m in swapped)
    owner = plan(swapped[1]).engine  # sampled last: it holds the slabs now
    assert built == sum(u.nbytes for u in owner.swapped_units) > 0  # one copy into RAM, ever


def test_slabs_stay_in_cpu_ram_when_comfyui_offloads_to_the_gpu(checkpoints, caplog):
    """--highvram / --gpu-only make ComfyUI's offload device the GPU; swapped blocks must still go to RAM."""
    model = load(checkpoints["t2v"])
    model.offload_device = torch.device("cuda", 0)  # what ComfyUI reports in those modes
    with caplog.at_level(logging.INFO):
        swapped = swap(model, blocks_to_swap=2)
    p = plan(swapped)
    assert p.engine.offload_device == torch.device("cpu")
    p.engine.park()  # on a CPU machine a slab on the "GPU" would fail here
    assert all(u.slab.device.type == "cpu" for u in p.engine.swapped_units)
    assert any(
        "--highvram / --gpu-only" in r.message and "kept in CPU RAM" in r.message for r in caplog.records
    )


def test_the_pinned_budget_is_comfyuis_limit_less_what_comfyui_pinned(monkeypatch):
    import psutil

    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 10 * 2**30, raising=False)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 3 * 2**30, raising=False)
    assert callbacks.pinned_budget() == 7 * 2**30
    # -1: pinning turned off (--disable-pinned-memory): this pack pins nothing either.
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1, raising=False)
    assert callbacks.pinned_budget() == 0
    # A ComfyUI without the setting (0.3.64): this pack's own share of the RAM, less what ComfyUI pinned.
    monkeypatch.delattr(mm, "MAX_PINNED_MEMORY", raising=False)
    from wan22_blockswap.block_manager import default_pinned_budget

    assert callbacks.pinned_budget() == default_pinned_budget() - 3 * 2**30
    # ComfyUI's Linux limit (up to 95 % of RAM) is capped at this pack's share: the machine keeps the rest.
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", int(0.95 * psutil.virtual_memory().total), raising=False)
    assert callbacks.pinned_budget() == default_pinned_budget() - 3 * 2**30


def test_comfyuis_offload_streams_wait_for_slot_copies_too(monkeypatch):
    """0.3.64 --async-offload casts even resident weights on ComfyUI's offload streams: they read slots."""
    device = torch.device("cuda", 0)
    made = []

    def fake_get_offload_stream(dev):
        made.append(dev)
        mm.STREAMS[dev] = ["stream-a", "stream-b"]
        return "stream-a"

    monkeypatch.setattr(mm, "STREAMS", {}, raising=False)
    monkeypatch.setattr(mm, "NUM_STREAMS", 2, raising=False)
    monkeypatch.setattr(mm, "get_offload_stream", fake_get_offload_stream)
    streams = callbacks._comfy_offload_streams(device)
    assert list(streams()) == ["stream-a", "stream-b"] and made == [device]  # created before the first cast
    assert list(streams()) == ["stream-a", "stream-b"] and made == [device]
    monkeypatch.setattr(mm, "NUM_STREAMS", 1, raising=False)
    monkeypatch.setattr(mm, "STREAMS", {}, raising=False)
    assert list(callbacks._comfy_offload_streams(device)()) == []  # no async offload: nothing extra


def test_dropping_the_model_frees_its_host_copies_and_returns_its_pinned_share(tmp_path):
    """What ComfyUI's /free (unload_models + free_memory) amounts to: models unloaded, then released."""
    import ctypes
    import gc
    import weakref

    import psutil

    from wan22_blockswap import block_manager as bm
    from wan22_blockswap import host_memory as hm

    path = write_checkpoint(tmp_path, "t2v", dim=512, num_layers=4)

    def rss():
        # glibc keeps freed blocks below its (moving) mmap threshold in the heap; trim them, so the reading
        # shows what this process holds rather than the allocator's cache.
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return psutil.Process().memory_info().rss

    def load_sample_drop():
        model = swap(load(path), blocks_to_swap=4, use_non_blocking=True, prefetch_blocks=1)
        sample(model)
        engine = plan(model).engine
        refs = [weakref.ref(engine)] + [weakref.ref(u.slab) for u in engine.swapped_units]
        slab_bytes = sum(u.nbytes for u in engine.swapped_units)
        loaded = rss()
        del model, engine
        mm.unload_all_models()
        mm.soft_empty_cache()
        return refs, slab_bytes, loaded - rss()

    load_sample_drop()  # first time: ComfyUI's and torch's own one-off allocations
    refs, slab_bytes, returned = load_sample_drop()
    assert slab_bytes > 30 * 2**20
    assert all(ref() is None for ref in refs)  # the engine and every slab are gone
    assert len(hm._PINNED.claims) == 0 and bm.pinned_bytes_in_use() == 0
    assert returned > slab_bytes // 2, (returned, slab_bytes)  # the host copies' RAM went back to the OS
