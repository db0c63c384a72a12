"""The swap engine on CPU: exact outputs, tensor placement, counters, copy/compute ordering."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.fakes.cudart import FakeCudart
from wan22_blockswap import block_manager as bm
from wan22_blockswap import host_memory as hm
from wan22_blockswap.bench import synthetic_model as sm
from wan22_blockswap.wan import units as wu


def make_engine(model, blocks_to_swap, prefetch=0, **kwargs):
    choice = wu.select_wan_units(
        model,
        blocks_to_swap,
        offload_txt_emb=kwargs.pop("offload_txt_emb", False),
        offload_img_emb=kwargs.pop("offload_img_emb", False),
        placement=kwargs.pop("placement", "tail"),
    )
    device = kwargs.pop("compute_device", "cpu")
    return bm.BlockSwapEngine(choice.units, choice.swap, device, prefetch_blocks=prefetch, **kwargs)


def snapshot(model):
    return {name: (p.device, p.detach().clone()) for name, p in model.state_dict(keep_vars=True).items()}


def assert_restored(model, before, params_before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (device, value) in before.items():
        assert after[name].device == device, name
        assert torch.equal(after[name].detach(), value), name
    # The very same Parameter objects: anything holding a reference to one stays valid.
    assert [id(p) for p in model.parameters()] == params_before


def assert_no_hooks(model):
    for module in model.modules():
        assert not module._forward_pre_hooks, module
        assert not module._forward_hooks, module


@pytest.fixture(scope="module")
def models():
    return {variant: sm.build_model("tiny", variant, num_layers=6) for variant in ("t2v", "i2v", "vace")}


SWAP_CASES = [("t2v", k, p) for k in (0, 1, 5, 6) for p in (0, 1, 2, 9)] + [
    (variant, k, p) for variant in ("i2v", "vace") for k, p in ((1, 0), (5, 1), (6, 2), (6, 9))
]


@pytest.mark.parametrize("variant, blocks_to_swap, prefetch", SWAP_CASES)
def test_swapped_output_equals_unswapped(models, variant, blocks_to_swap, prefetch):
    model = models[variant]
    inputs = sm.example_inputs(model, vace_contexts=2)
    reference = model(**inputs)
    other_inputs = sm.example_inputs(model, seed=7, vace_contexts=2)
    other_reference = model(**other_inputs)
    engine = make_engine(model, blocks_to_swap, prefetch, offload_txt_emb=True, offload_img_emb=True)
    with engine.attached():
        for _ in range(2):
            assert torch.equal(model(**inputs), reference)
            assert torch.equal(model(**other_inputs), other_reference)
    assert torch.equal(model(**inputs), reference)


def test_detach_restores_every_parameter(models):
    model = models["i2v"]
    before, ids = snapshot(model), [id(p) for p in model.parameters()]
    engine = make_engine(model, 4, prefetch=1, offload_txt_emb=True, offload_img_emb=True)
    with engine.attached():
        model(**sm.example_inputs(model))
    assert_restored(model, before, ids)
    assert_no_hooks(model)


def test_attach_and_detach_twice_are_harmless(models):
    model = models["t2v"]
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    engine = make_engine(model, 3, prefetch=1)
    engine.attach()
    engine.attach()
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 3
    assert torch.equal(model(**inputs), reference)
    engine.detach()
    engine.detach()
    assert_no_hooks(model)
    assert engine.slot_buffers() == []


def test_exception_inside_a_block_leaves_the_model_clean(models):
    model = models["t2v"]
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    before, ids = snapshot(model), [id(p) for p in model.parameters()]
    engine = make_engine(model, 4, prefetch=1)
    victim = model.blocks[4]

    def explode(module, args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with engine.attached():
            handle = victim.register_forward_pre_hook(explode)
            try:
                model(**inputs)
            finally:
                handle.remove()
    assert_no_hooks(model)
    assert_restored(model, before, ids)
    # No tensor of a swapped unit still points into a (released) slot.
    for unit in engine.swapped_units:
        for spec, view in zip(unit.layout, unit.slab_views, strict=True):
            assert getattr(spec.owner, spec.attr).data_ptr() == view.data_ptr()
    with engine.attached():
        assert torch.equal(model(**inputs), reference)


def test_exception_in_the_middle_of_a_forward_leaves_the_model_clean(models):
    model = models["t2v"]
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    engine = make_engine(model, 4, prefetch=2)
    victim = model.blocks[3].ffn  # inside a swapped block: its tensors are bound to a slot right now

    def explode(module, args):
        raise ValueError("inside")

    handle = victim.register_forward_pre_hook(explode)
    try:
        with pytest.raises(ValueError), engine.attached():
            model(**inputs)
    finally:
        handle.remove()
    slab_ptrs = {view.data_ptr() for u in engine.swapped_units for view in u.slab_views}
    assert {p.data_ptr() for p in model.blocks[3].parameters()} <= slab_ptrs
    with engine.attached():
        assert torch.equal(model(**inputs), reference)


def _storage_range(t):
    start = t.untyped_storage().data_ptr()
    return start, start + t.untyped_storage().nbytes()


def test_swapped_tensors_live_in_a_slot_during_forward_and_in_the_slab_between(models):
    model = models["t2v"]
    engine = make_engine(model, 4, prefetch=1)
    seen = []

    def check_bound(module, args):
        slots = [_storage_range(b) for b in engine.slot_buffers()]
        for p in module.parameters():
            ptr = p.data_ptr()
            seen.append(any(lo <= ptr < hi for lo, hi in slots))

    with engine.attached():
        handles = [b.register_forward_pre_hook(check_bound) for b in model.blocks[2:]]
        model(**sm.example_inputs(model))
        for h in handles:
            h.remove()
        # Between forwards (still attached) the swapped blocks view their slabs.
        for unit in engine.swapped_units:
            lo, hi = _storage_range(unit.slab)
            assert all(lo <= p.data_ptr() < hi for p in unit.module.parameters())
    assert seen and all(seen)
    for unit in engine.swapped_units:
        lo, hi = _storage_range(unit.slab)
        assert all(lo <= p.data_ptr() < hi for p in unit.module.parameters())
    # Resident blocks were never touched.
    assert not any(
        any(lo <= p.data_ptr() < hi for lo, hi in [_storage_range(b) for b in engine.slot_buffers()])
        for p in model.blocks[0].parameters()
    )


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_counters_report_bytes_copied_per_pass(models, prefetch):
    model = models["t2v"]
    engine = make_engine(model, 5, prefetch=prefetch)
    inputs = sm.example_inputs(model)
    passes = 4
    with engine.attached():
        for _ in range(passes):
            model(**inputs)
    units = engine.swapped_units
    slab_bytes = sum(u.nbytes for u in units)
    # Slabs hold exactly the parameters, each padded to the alignment boundary.
    assert (
        engine.swapped_bytes()
        <= slab_bytes
        < engine.swapped_bytes() + bm.TENSOR_ALIGNMENT * sum(len(u.layout) for u in units)
    )
    # Every pass copies every swapped unit once; the last unit of the last pass also prefetched the
    # first `prefetch` units of a pass that never came.
    wrapped = sum(u.nbytes for u in units[:prefetch])
    assert engine.counters.passes == passes
    assert engine.counters.unit_runs == passes * len(units)
    assert engine.counters.bytes_copied == slab_bytes * passes + wrapped
    assert engine.counters.copies == len(units) * passes + prefetch
    assert engine.counters.misses == (len(units) * passes if prefetch == 0 else 0)


def test_units_that_fit_in_the_slots_are_copied_once_per_run(models):
    model = models["t2v"]
    engine = make_engine(model, 2, prefetch=1)  # 2 swapped units, 2 slots
    with engine.attached():
        for _ in range(3):
            model(**sm.example_inputs(model))
    assert engine.counters.copies == 2
    assert engine.counters.slot_hits == 4


def test_slots_match_prefetch_depth_and_exist_only_while_attached(models):
    model = models["t2v"]
    engine = make_engine(model, 5, prefetch=2)
    largest = max(u.param_bytes() for u in engine.swapped_units)
    assert engine.slot_buffers() == []
    with engine.attached():
        slots = engine.slot_buffers()
        assert len(slots) == 3 == engine.num_slots()
        assert all(s.numel() == max(u.nbytes for u in engine.swapped_units) for s in slots)
        assert largest <= slots[0].numel() < largest + 64 * bm.TENSOR_ALIGNMENT
    assert engine.slot_buffers() == []
    assert make_engine(model, 2, prefetch=5).num_slots() == 2  # never more slots than swapped units


def test_slabs_persist_across_runs(models):
    model = models["t2v"]
    engine = make_engine(model, 3, prefetch=1)
    with engine.attached():
        model(**sm.example_inputs(model))
    slabs = [u.slab.data_ptr() for u in engine.swapped_units]
    with engine.attached():
        model(**sm.example_inputs(model))
    assert [u.slab.data_ptr() for u in engine.swapped_units] == slabs


def test_a_weight_replaced_between_runs_is_picked_up(models):
    model = sm.build_model("tiny", num_layers=4)
    engine = make_engine(model, 2, prefetch=1)
    inputs = sm.example_inputs(model)
    with engine.attached():
        model(**inputs)
    new_weight = torch.randn_like(model.blocks[3].ffn[0].weight)
    model.blocks[3].ffn[0].weight.data = new_weight.clone()
    expected = model(**inputs)
    with engine.attached():
        assert torch.equal(model(**inputs), expected)
    assert torch.equal(model.blocks[3].ffn[0].weight, new_weight)


def test_unit_loaded_callback_patches_the_slot_not_the_slab(models):
    model = sm.build_model("tiny", num_layers=4)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    delta = 0.01 * torch.randn_like(model.blocks[3].ffn[2].weight)
    original = model.blocks[3].ffn[2].weight.detach().clone()
    with torch.no_grad():
        model.blocks[3].ffn[2].weight += delta
    patched_reference = model(**inputs)
    with torch.no_grad():
        model.blocks[3].ffn[2].weight.copy_(original)
    calls = []

    def patch(name, module):
        calls.append(name)
        if name == "blocks.3":
            module.ffn[2].weight.data += delta

    engine = make_engine(model, 3, prefetch=1, on_unit_loaded=patch)
    with engine.attached():
        patched = model(**inputs)
        model(**inputs)
    torch.testing.assert_close(patched, patched_reference)
    assert calls.count("blocks.3") == 2  # once per copy, 2 passes
    assert torch.equal(model(**inputs), reference)  # slab pristine


def test_placement_spread_interleaves_resident_blocks():
    names = [f"blocks.{i}" for i in range(10)]
    assert bm.choose_swapped_blocks(names, 3) == ["blocks.7", "blocks.8", "blocks.9"]
    spread = bm.choose_swapped_blocks(names, 5, "spread")
    assert len(spread) == 5 and spread[-1] == "blocks.9"
    assert spread == ["blocks.1", "blocks.3", "blocks.5", "blocks.7", "blocks.9"]
    assert bm.choose_swapped_blocks(names, 10, "spread") == names
    assert bm.choose_swapped_blocks(names, 0, "spread") == []


def test_spread_placement_output_equals_unswapped(models):
    model = models["vace"]
    inputs = sm.example_inputs(model, vace_contexts=2)
    reference = model(**inputs)
    engine = make_engine(model, 3, prefetch=1, placement="spread")
    with engine.attached():
        assert torch.equal(model(**inputs), reference)


def test_plan_summary_uses_the_debug_output_words(models):
    engine = make_engine(models["i2v"], 4, prefetch=1, offload_img_emb=True)
    lines = engine.describe()
    assert lines[:5] == [
        "Total blocks: 6",
        "Keeping on GPU: blocks 0-1",
        "Offloading to CPU: blocks 2-5",
        "GPU blocks: 2",
        "CPU blocks: 4",
    ]
    assert any(line.startswith("img_emb: streamed from CPU RAM") for line in lines)
    assert any(line.startswith("text_embedding: kept on the GPU") for line in lines)


def test_debug_logs_plan_and_run_summary(models, caplog):
    model = models["t2v"]
    engine = make_engine(model, 3, prefetch=1, debug=True)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        with engine.attached():
            model(**sm.example_inputs(model))
    messages = [r.getMessage() for r in caplog.records]
    assert "[BlockSwap] Total blocks: 6" in messages
    assert "[BlockSwap] Offloading to CPU: blocks 3-5" in messages
    summary = [m for m in messages if m.startswith("[BlockSwap] Run:")]
    assert len(summary) == 1 and "1 passes" in summary[0] and "4 copies" in summary[0]


# -- tensor subclasses (GGUF-style quantized weights) -----------------------------------------


class QuantWeight(torch.Tensor):
    """Stand-in for a GGUF tensor: raw int8 bytes plus quant metadata in Python attributes."""

    @staticmethod
    def __new__(cls, raw, scale, logical_shape):
        t = torch.Tensor._make_subclass(cls, raw, False)
        t.tensor_type = "Q8_TEST"
        t.tensor_shape = torch.Size(logical_shape)
        t.scale = scale
        t.patches = []
        return t

    @property
    def shape(self):  # like ComfyUI-GGUF: the logical shape, not the raw one
        return self.tensor_shape

    def detach(self):  # like ComfyUI-GGUF: an alias, which keeps the attributes (nn.Parameter detaches)
        return self


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().max() / 127
        raw = torch.round(w / scale).to(torch.int8)
        self.weight = nn.Parameter(QuantWeight(raw, float(scale), w.shape), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        w = self.weight
        assert isinstance(w, QuantWeight) and w.tensor_type == "Q8_TEST"
        raw = torch.Tensor.as_subclass(w, torch.Tensor)
        weight = raw.to(x.dtype) * w.scale
        return nn.functional.linear(x, weight.view(w.tensor_shape), self.bias)


def test_quantized_tensor_subclass_moves_as_bytes_and_keeps_metadata():
    model = sm.build_model("tiny", num_layers=4)
    for block in model.blocks:
        block.ffn[0] = QuantLinear(block.ffn[0])
        block.ffn[2] = QuantLinear(block.ffn[2])
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    weight = model.blocks[3].ffn[0].weight
    engine = make_engine(model, 3, prefetch=1)
    seen = []

    def check(module, args):
        w = module.weight
        slots = [_storage_range(b) for b in engine.slot_buffers()]
        seen.append(
            (type(w) is QuantWeight, w.tensor_type, w.dtype, any(lo <= w.data_ptr() < hi for lo, hi in slots))
        )

    with engine.attached():
        handle = model.blocks[3].ffn[0].register_forward_pre_hook(check)
        assert torch.equal(model(**inputs), reference)
        handle.remove()
    assert seen == [(True, "Q8_TEST", torch.int8, True)]
    assert model.blocks[3].ffn[0].weight is weight
    assert weight.tensor_shape == torch.Size([256, 128]) and weight.shape == torch.Size([256, 128])
    assert torch.equal(model(**inputs), reference)


# -- fake transports: prove every wait is where it must be ------------------------------------


class DelayedReorderingTransport(bm.SyncTransport):
    """Copies land as late as allowed (when compute waits for that slot), so copies into different slots
    land in any order; copies into one slot land in issue order, as on one copy stream.

    Records a violation when a copy targets a slot whose reader has not been marked free: on a GPU
    that copy could overwrite weights a running kernel still reads.
    """

    def __init__(self, num_slots):
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.in_use = [False] * num_slots
        self.violations: list[str] = []
        self.waits = 0

    def start_copy(self, slot, dst, src):
        if self.in_use[slot]:
            self.violations.append(f"copy into slot {slot} while compute may still read it")
        self.pending.append((slot, dst, src.clone()))

    def wait_copied(self, slot):
        self.waits += 1
        mine = [p for p in self.pending if p[0] == slot]
        self.pending = [p for p in self.pending if p[0] != slot]
        for _, dst, src in mine:
            dst.copy_(src)
        self.in_use[slot] = True

    def mark_free(self, slot):
        self.in_use[slot] = False

    def finish(self):
        self.pending.clear()


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_engine_waits_correctly_under_delayed_reordered_copies(models, prefetch):
    model = models["vace"]
    inputs = sm.example_inputs(model, vace_contexts=2)
    reference = model(**inputs)
    transports = []

    def factory(n):
        transports.append(DelayedReorderingTransport(n))
        return transports[-1]

    engine = make_engine(model, 5, prefetch=prefetch, transport_factory=factory)
    with engine.attached():
        for _ in range(3):
            assert torch.equal(model(**inputs), reference)
    assert transports[0].violations == []
    assert transports[0].waits == engine.counters.unit_runs


def test_without_the_ready_wait_outputs_go_wrong(models):
    """The delayed transport really detects a missing wait: skip it and results change."""
    model = models["t2v"]
    inputs = sm.example_inputs(model)
    reference = model(**inputs)

    class NoWait(DelayedReorderingTransport):
        def wait_copied(self, slot):
            self.in_use[slot] = True  # compute starts without waiting for the copy

    engine = make_engine(model, 5, prefetch=1, transport_factory=NoWait)
    with engine.attached():
        assert not torch.equal(model(**inputs), reference)


def test_without_marking_slots_free_reuse_is_flagged(models):
    """The delayed transport really detects a slot reused before its reader finished."""
    model = models["t2v"]
    transports = []

    class NeverFree(DelayedReorderingTransport):
        def mark_free(self, slot):
            pass

    def factory(n):
        transports.append(NeverFree(n))
        return transports[-1]

    engine = make_engine(model, 5, prefetch=1, transport_factory=factory)
    with engine.attached():
        model(**sm.example_inputs(model))
    assert transports[0].violations


def test_engine_marks_each_slot_free_after_its_unit_ran(models):
    model = models["t2v"]
    log = []

    class Recording(bm.SyncTransport):
        def start_copy(self, slot, dst, src):
            log.append(("copy", slot))
            super().start_copy(slot, dst, src)

        def wait_copied(self, slot):
            log.append(("wait", slot))

        def mark_free(self, slot):
            log.append(("free", slot))

    engine = make_engine(model, 4, prefetch=1, transport_factory=lambda n: Recording())
    with engine.attached():
        model(**sm.example_inputs(model))
    # Each wait on a slot is followed by that slot's free before any new copy into it.
    open_reads = set()
    for op, slot in log:
        if op == "wait":
            open_reads.add(slot)
        elif op == "free":
            open_reads.discard(slot)
        else:
            assert slot not in open_reads, log
    assert log.count(("free", 0)) + log.count(("free", 1)) == engine.counters.unit_runs


# -- the slot ring: units out of order --------------------------------------------------------


def linear_chain(n=5, width=16, seed=0):
    torch.manual_seed(seed)
    return [(f"blocks.{i}", nn.Linear(width, width)) for i in range(n)]


def run_chain(units, order, x):
    for i in order:
        x = torch.tanh(units[i][1](x))
    return x


# One pass each: in order; block 2 skipped (a patch replaced it); block 3 run twice in a row (a VACE
# block's second context); a pass cut short after block 1, then a full one.
OUT_OF_ORDER = [[0, 1, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 3, 3, 4], [0, 1], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("prefetch", [0, 1, 2, 4])
def test_units_out_of_order_still_compute_exactly(prefetch):
    units = linear_chain()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = [run_chain(units, order, x) for order in OUT_OF_ORDER]
    transports = []

    def factory(n):
        transports.append(DelayedReorderingTransport(n))
        return transports[-1]

    engine = bm.BlockSwapEngine(
        units, [n for n, _ in units], "cpu", prefetch_blocks=prefetch, transport_factory=factory
    )
    with torch.no_grad(), engine.attached():
        got = [run_chain(units, order, x) for order in OUT_OF_ORDER]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert transports[0].violations == []
    assert transports[0].waits == engine.counters.unit_runs == sum(len(o) for o in OUT_OF_ORDER)


def test_a_repeated_unit_reuses_its_slot_and_a_skipped_one_costs_no_copy():
    units = linear_chain()
    engine = bm.BlockSwapEngine(units, [n for n, _ in units], "cpu", prefetch_blocks=1)
    x = torch.randn(3, 16)
    with torch.no_grad(), engine.attached():
        run_chain(units, [0, 1, 2, 3, 4], x)
        assert (engine.counters.copies, engine.counters.misses) == (6, 0)  # 5 + the wrapped prefetch of 0
        run_chain(units, [0, 1, 1, 2], x)  # block 1 again: still in its slot
        assert engine.counters.slot_hits == 1 and engine.counters.misses == 0
        copies = engine.counters.copies
        run_chain(units, [4], x)  # 3 skipped: its prefetched copy is wasted, 4 loads on demand
        assert engine.counters.misses == 1 and engine.counters.copies == copies + 2  # 4, and 0 behind it


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input_names_the_input_and_valid_range(models):
    model = models["t2v"]
    units = wu.execution_order(model)
    with pytest.raises(ValueError, match=r"swap names unknown unit\(s\) \['blocks\.99'\]"):
        bm.BlockSwapEngine(units, ["blocks.99"], "cpu")
    with pytest.raises(ValueError, match=r"blocks_to_swap must be between 0 and 6 for this model \(got 7\)"):
        wu.select_wan_units(model, 7)
    with pytest.raises(ValueError, match=r"blocks_to_swap must be between 0 and 6 for this model \(got -1\)"):
        wu.select_wan_units(model, -1)
    with pytest.raises(ValueError, match=r"prefetch_blocks must be an integer >= 0 \(got -1\)"):
        bm.BlockSwapEngine(units, [], "cpu", prefetch_blocks=-1)
    with pytest.raises(ValueError, match=r"units\[1\] \('x'\) must be a torch.nn.Module \(got int\)"):
        bm.BlockSwapEngine([("text_embedding", model.text_embedding), ("x", 3)], [], "cpu")
    with pytest.raises(ValueError, match="must not overlap"):
        bm.BlockSwapEngine([("blocks.0", model.blocks[0]), ("ffn", model.blocks[0].ffn)], [], "cpu")
    with pytest.raises(ValueError, match="vace_blocks_to_swap must be between 0 and 3"):
        wu.select_wan_units(models["vace"], 2, vace_blocks_to_swap=4)
    with pytest.raises(ValueError, match="vace_blocks_to_swap must be 0 for a model without VACE"):
        wu.select_wan_units(model, 2, vace_blocks_to_swap=1)
    with pytest.raises(ValueError, match="placement must be 'tail' or 'spread'"):
        wu.select_wan_units(model, 2, placement="middle")


def test_bad_input_leaves_the_model_untouched(models):
    model = models["t2v"]
    before, ids = snapshot(model), [id(p) for p in model.parameters()]
    with pytest.raises(ValueError):
        bm.BlockSwapEngine(wu.execution_order(model), ["blocks.5", "nope"], "cpu")
    assert_restored(model, before, ids)
    assert_no_hooks(model)


# -- WAN unit order ----------------------------------------------------------------------------


def test_execution_order_interleaves_vace_blocks_where_they_run(models):
    names = [n for n, _ in wu.execution_order(models["vace"])]
    assert names == [
        "text_embedding",
        "blocks.0",
        "vace_blocks.0",
        "blocks.1",
        "blocks.2",
        "vace_blocks.1",
        "blocks.3",
        "blocks.4",
        "vace_blocks.2",
        "blocks.5",
    ]
    assert [n for n, _ in wu.execution_order(models["i2v"])][:3] == ["text_embedding", "img_emb", "blocks.0"]


def test_vace_auto_swaps_the_same_share_of_vace_blocks(models):
    choice = wu.select_wan_units(models["vace"], 4)
    assert choice.vace_blocks_to_swap == 2
    assert [s for s in choice.swap if s.startswith("vace")] == ["vace_blocks.1", "vace_blocks.2"]
    assert wu.select_wan_units(models["vace"], 4, vace_blocks_to_swap=3).vace_blocks_to_swap == 3


def test_wan_model_recognition(models):
    assert all(wu.is_wan_model(m) for m in models.values())
    assert not wu.is_wan_model(nn.Linear(2, 2))
    assert not wu.is_wan_model("model")


def test_default_pinned_budget_is_the_share_quoted_in_the_tooltip():
    import psutil

    assert hm.DEFAULT_PINNED_RAM_SHARE == 0.45
    assert hm.default_pinned_budget() == int(psutil.virtual_memory().total * 0.45)
    # Without a GPU nothing is pinned, whatever the setting.
    model = sm.build_model("tiny", num_layers=4)
    engine = make_engine(model, 2, prefetch=1, use_non_blocking=True)
    with engine.attached():
        model(**sm.example_inputs(model))
    assert engine.pinned_bytes() == 0 and bm.pinned_bytes_in_use() == 0


# -- host memory: pinning failures, the shared pinned budget, RAM before slabs -----------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA runtime stand-in and a record of every time the engine cleared CUDA's last error."""

    def install(**errors):
        runtime = FakeCudart(**errors)
        runtime.discarded = []
        monkeypatch.setattr(hm, "_cuda_runtime", lambda: runtime)
        monkeypatch.setattr(hm, "_discard_cuda_error", lambda: runtime.discarded.append(True))
        return runtime

    return install


def gpu_engine(model, blocks_to_swap, **kwargs):
    """An engine that thinks its compute device is a GPU: park() builds (and pins) slabs, nothing runs."""
    return make_engine(
        model, blocks_to_swap, prefetch=1, compute_device="cuda", use_non_blocking=True, **kwargs
    )


def test_a_failed_pin_clears_cudas_error_and_falls_back_to_pageable_with_one_warning(fake_cuda, caplog):
    runtime = fake_cuda(register_error=712)  # cudaErrorHostMemoryAlreadyRegistered, say
    model = sm.build_model("tiny", num_layers=4)
    engine = gpu_engine(model, 3)
    with caplog.at_level("WARNING"):
        engine.park()
    assert engine.pinned_bytes() == 0 and bm.pinned_bytes_in_use() == 0
    assert len(runtime.discarded) == 3  # one clear per failed register: no stale error reaches a kernel
    assert sum("pageable RAM" in r.message for r in caplog.records) == 1
    assert all(u.slab.device.type == "cpu" for u in engine.swapped_units)
    engine.release()


def test_a_failed_unpin_is_reported_and_cleared(fake_cuda, caplog):
    runtime = fake_cuda(unregister_error=1)
    model = sm.build_model("tiny", num_layers=4)
    engine = gpu_engine(model, 2, pinned_budget_bytes=2**40)
    engine.park()
    assert engine.pinned_bytes() > 0 and len(runtime.registered) == 2
    with caplog.at_level("WARNING"):
        engine.release()
    assert len(runtime.discarded) == 2
    assert sum("cudaHostUnregister failed" in r.message for r in caplog.records) == 2
    assert bm.pinned_bytes_in_use() == 0


def test_two_models_share_the_pinned_budget_in_proportion(fake_cuda):
    fake_cuda()
    high, low = sm.build_model("tiny", num_layers=4, seed=1), sm.build_model("tiny", num_layers=4, seed=2)
    budget = (
        4 * max(u.param_bytes() for u in make_engine(high, 4).swapped_units) + 4 * bm.TENSOR_ALIGNMENT * 40
    )
    engines = [gpu_engine(m, 4, pinned_budget_bytes=budget) for m in (high, low)]
    engines[0].park()  # the first expert to load must leave the second its share
    engines[1].park()
    pinned = [e.pinned_bytes() for e in engines]
    assert pinned[0] > 0 and pinned[1] > 0, pinned
    assert abs(pinned[0] - pinned[1]) <= max(u.nbytes for u in engines[0].swapped_units)
    assert sum(pinned) <= budget
    for e in engines:
        e.release()
    assert bm.pinned_bytes_in_use() == 0


def test_slabs_that_do_not_fit_in_free_ram_are_refused_before_any_is_built(models, monkeypatch):
    model = sm.build_model("tiny", num_layers=4)
    engine = make_engine(model, 3)
    before = snapshot(model)
    params_before = [id(p) for p in model.parameters()]
    monkeypatch.setattr(hm, "available_ram", lambda: 1000)
    with pytest.raises(
        bm.HostMemoryError, match=r"Not enough free RAM .* needed, 1000\.0 B|Not enough free RAM"
    ):
        engine.park()
    err = pytest.raises(bm.HostMemoryError, engine.park).value
    assert "available" in str(err) and "fp8" in str(err) and "swapped units" in str(err)
    assert all(u.slab is None for u in engine.swapped_units) and engine.counters.slabs_built == 0
    assert_restored(model, before, params_before)


def test_slab_progress_is_reported_and_counted(models):
    model = sm.build_model("tiny", num_layers=4)
    ticks = []
    engine = make_engine(model, 3, on_slab_built=lambda done, total: ticks.append((done, total)))
    engine.park()
    engine.park()  # slabs current: nothing built again
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    assert engine.counters.slabs_built == 3
    assert engine.counters.slab_bytes_built == sum(u.nbytes for u in engine.swapped_units)


def test_a_second_plan_for_the_same_model_adopts_the_slabs_without_copying(models):
    model = sm.build_model("tiny", num_layers=6)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    first, second = make_engine(model, 4), make_engine(model, 5)
    with first.attached():
        model(**inputs)
    adopted = second.adopt_slabs(first)
    first.forget_slabs()
    assert adopted == sum(u.nbytes for u in second.swapped_units[1:])  # blocks 2-5: both swap them
    with second.attached():
        assert torch.equal(model(**inputs), reference)
    assert second.counters.slabs_built == 1  # only block 1, which the first plan kept on the device


def test_slabs_filled_from_sources_hold_the_source_values_in_the_tensors_dtype(models):
    """A loader that never filled the swapped parameters hands their file tensors to park(): the slab
    gets the source's values (converted to the parameter's dtype, as Tensor.copy_ converts), the
    parameters themselves are never read, and the counters show each source read once."""
    model = sm.build_model("tiny", num_layers=4)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    engine = make_engine(model, 2)
    swapped = [t for unit in engine.swapped_units for *_, t in unit.tensors()]
    # The "file": float64 copies of the true values; the parameters are overwritten with garbage.
    sources = {id(t): t.detach().clone().double() for t in swapped}
    with torch.no_grad():
        for t in swapped:
            t.fill_(float("nan"))
    engine.park(sources)
    assert engine.counters.slab_tensors_from_sources == len(swapped)
    assert engine.counters.slab_bytes_from_sources == sum(s.numel() * 8 for s in sources.values())
    assert engine.counters.slabs_built == 2
    for unit in engine.swapped_units:
        start = unit.slab.data_ptr()
        for *_, t in unit.tensors():
            assert start <= t.data_ptr() < start + unit.nbytes and t.dtype == torch.float32
    with engine.attached():
        assert torch.equal(model(**inputs), reference)


def test_a_source_of_another_shape_is_refused_naming_the_tensor(models):
    model = sm.build_model("tiny", num_layers=4)
    engine = make_engine(model, 1)
    owner, attr, _, t = next(iter(engine.swapped_units[0].tensors()))
    with pytest.raises(ValueError, match=rf"{type(owner).__name__}\.{attr}.*shape"):
        engine.park({id(t): torch.zeros(3, 3, 3)})


def test_free_ram_for_source_filled_slabs_counts_every_slab(models, monkeypatch):
    """Parameters that were never filled free nothing when a slab takes over: all slabs need new RAM."""
    model = sm.build_model("tiny", num_layers=4)
    engine = make_engine(model, 3)
    sizes = [bm._layout_size(u) for u in engine.swapped_units]
    monkeypatch.setattr(hm, "available_ram", lambda: sum(sizes) - 1)
    engine.park()  # from the tensors themselves: one slab of headroom at a time is enough
    fresh = make_engine(sm.build_model("tiny", num_layers=4), 3)
    sources = {id(t): t.detach().clone() for u in fresh.swapped_units for *_, t in u.tensors()}
    with pytest.raises(bm.HostMemoryError):
        fresh.park(sources)


def test_fewest_swapped_for_budget_counts_resident_bytes_and_slots():
    sizes = {"a": 10, "b": 10, "c": 30}
    candidates = [[], ["c"], ["b", "c"], ["a", "b", "c"]]
    total = 100  # 50 outside the units
    # two slots, k=0: 100; k=1: 70 + 1 slot (one unit) of 30 = 100; k=2: 60 + 60 = 120; k=3: 50 + 60 = 110
    assert bm.fewest_swapped_for_budget(candidates, sizes, total, 2, 100).count == 0
    # one slot, k=0: 100; k=1: 70 + 30 = 100; k=2: 60 + 30 = 90
    plan = bm.fewest_swapped_for_budget(candidates, sizes, total, 1, 95)
    assert (plan.count, plan.resident_bytes, plan.slot_bytes, plan.fits) == (2, 60, 30, True)
    plan = bm.fewest_swapped_for_budget(candidates, sizes, total, 2, 99)
    assert (plan.count, plan.fits, plan.device_bytes) == (3, False, 110)
    with pytest.raises(ValueError, match="at least one candidate"):
        bm.fewest_swapped_for_budget([], sizes, total, 1, 1)


def test_set_swapped_moves_units_in_and_out_of_the_swapped_set_with_exact_outputs(models):
    model = sm.build_model("tiny", num_layers=6)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    engine = make_engine(model, 2, prefetch=1)
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    left_unit = engine.swapped_units[0]
    joined, left = engine.set_swapped(["blocks.1", "blocks.2", "blocks.5"])
    assert (joined, left) == (["blocks.1", "blocks.2"], ["blocks.4"])
    assert left_unit.slab is None and not left_unit.swapped  # its slab given up
    assert [u.name for u in engine.order] == ["blocks.1", "blocks.2", "blocks.5"]
    built = engine.counters.slabs_built
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    assert engine.counters.slabs_built == built + 2  # only the units that joined
    engine.set_swapped([])
    with engine.attached():
        assert engine.num_slots() == 0 and not engine.slot_buffers()
        assert all(not m._forward_pre_hooks for m in model.modules())  # nothing swapped: no hooks
        assert torch.equal(model(**inputs), reference)
    with engine.attached(), pytest.raises(RuntimeError, match="detach"):
        engine.set_swapped(["blocks.0"])
    with pytest.raises(ValueError, match="unknown unit"):
        engine.set_swapped(["blocks.99"])


# -- pinned slabs when the swapped set changes (issue 20, items 1, 6 and 10) -------------------------


def assert_pins_match(engine, runtime):
    """The ledger, the engine's own list and CUDA's registrations all name exactly the pinned slabs."""
    slabs = [u.slab for u in engine.swapped_units if u.slab is not None and u.slab_pinned]
    assert sorted(runtime.registered) == sorted(s.data_ptr() for s in slabs)
    assert sorted(id(s) for s in engine.host.pinned) == sorted(id(s) for s in slabs)
    assert bm.pinned_bytes_in_use() == sum(s.numel() for s in slabs) == engine.pinned_bytes()


def test_pinned_blocks_that_join_then_leave_are_unpinned_one_by_one(fake_cuda):
    runtime = fake_cuda()
    model = sm.build_model("tiny", num_layers=6)
    engine = gpu_engine(model, 2, pinned_budget_bytes=2**40)
    engine.park()
    engine.set_swapped(["blocks.2", "blocks.3", "blocks.4", "blocks.5"])  # auto: more blocks join
    engine.park()
    assert_pins_match(engine, runtime)
    assert len(runtime.registered) == 4
    # ... and leave again: blocks.2 and blocks.3 sit behind blocks.4 and blocks.5 in the pinned list.
    assert engine.set_swapped(["blocks.5"]) == ([], ["blocks.2", "blocks.3", "blocks.4"])
    assert_pins_match(engine, runtime)
    assert len(runtime.registered) == 1
    engine.release()
    assert runtime.registered == {} and bm.pinned_bytes_in_use() == 0


def test_a_block_leaves_while_the_text_embedding_is_swapped_and_pinned(fake_cuda):
    runtime = fake_cuda()
    model = sm.build_model("tiny", num_layers=6)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    engine = gpu_engine(model, 3, offload_txt_emb=True, pinned_budget_bytes=2**40)
    engine.park()  # the embedding's slab is first in the pinned list and of another size
    assert engine.set_swapped(["text_embedding", "blocks.5"]) == ([], ["blocks.3", "blocks.4"])
    assert_pins_match(engine, runtime)
    assert len(runtime.registered) == 2
    # Run it on CPU (no stream API there): the same slabs must hold the weights.
    engine.compute_device, engine._streams = torch.device("cpu"), None
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    engine.release()
    assert runtime.registered == {}


def test_pinned_slabs_are_adopted_across_swap_sets(fake_cuda):
    runtime = fake_cuda()
    model = sm.build_model("tiny", num_layers=6)
    first = gpu_engine(model, 5, pinned_budget_bytes=2**40)
    first.park()
    second = gpu_engine(model, 2, pinned_budget_bytes=2**40)  # blocks 4 and 5: last in first's list
    assert second.adopt_slabs(first) == sum(u.nbytes for u in second.swapped_units)
    assert second.pinned_bytes() == sum(u.nbytes for u in second.swapped_units)
    assert sorted(id(s) for s in second.host.pinned) == sorted(id(u.slab) for u in second.swapped_units)
    assert not any(s is u.slab for s in first.host.pinned for u in second.swapped_units)
    first.forget_slabs()  # unpins blocks 1-3 only
    assert_pins_match(second, runtime)
    second.release()
    assert runtime.registered == {} and bm.pinned_bytes_in_use() == 0


def test_adopted_pageable_slabs_are_pinned_within_the_budget(fake_cuda):
    runtime = fake_cuda()
    model = sm.build_model("tiny", num_layers=6)
    first = make_engine(model, 4, prefetch=1, compute_device="cuda", use_non_blocking=False)
    first.park()
    assert first.pinned_bytes() == 0
    second = gpu_engine(model, 3, pinned_budget_bytes=2**40)
    second.adopt_slabs(first)
    first.forget_slabs()
    second.park()
    assert second.pinned_bytes() == sum(u.nbytes for u in second.swapped_units)
    assert_pins_match(second, runtime)
    second.release()
    # Within the budget only: a budget of one slab pins one of the adopted slabs, the rest stay pageable.
    third = gpu_engine(model, 3, pinned_budget_bytes=second.swapped_units[0].nbytes)
    third.adopt_slabs(second)
    second.forget_slabs()
    third.park()
    assert third.pinned_bytes() == third.swapped_units[0].nbytes
    assert_pins_match(third, runtime)
    third.release()


def test_slabs_are_pinned_portable_for_any_device(fake_cuda):
    """cudaHostRegisterPortable (1): the load device need not be the current device when we pin."""
    runtime = fake_cuda()
    engine = gpu_engine(sm.build_model("tiny", num_layers=4), 2, pinned_budget_bytes=2**40)
    engine.park()
    assert runtime.flags == [1, 1]
    engine.release()
