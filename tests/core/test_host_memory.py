"""The host tiers on CPU: swapped units left in the file they were mapped from, the RAM policy that
chooses between slabs and files, the pinned budget's cap, and where a tensor's bytes really live."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.fakes.cudart import FakeCudart
from wan22_blockswap import block_manager as bm
from wan22_blockswap import host_memory as hm
from wan22_blockswap.bench import synthetic_model as sm
from wan22_blockswap.tensor_layout import _set_tensor
from wan22_blockswap.wan import units as wu

MIB = 2**20


def make_engine(model, blocks_to_swap, **kwargs):
    choice = wu.select_wan_units(model, blocks_to_swap, offload_txt_emb=kwargs.pop("offload_txt_emb", False))
    device = kwargs.pop("compute_device", "cpu")
    return bm.BlockSwapEngine(
        choice.units, choice.swap, device, prefetch_blocks=kwargs.pop("prefetch", 1), **kwargs
    )


def map_from_file(model, path, names=None, mode="r"):
    """Write the chosen blocks' tensors into a file and make them views of its memory map, as a GGUF
    loader leaves its weights (mode "r": MAP_SHARED, read-only; "c": private copy-on-write)."""
    blocks = [b for i, b in enumerate(model.blocks) if names is None or f"blocks.{i}" in names]
    entries = [
        (m, a, p) for b in blocks for m in b.modules() for a, p in m._parameters.items() if p is not None
    ]
    offsets, offset = [], 0
    with open(path, "wb") as f:
        for _m, _a, p in entries:
            offsets.append(offset)
            raw = p.detach().contiguous().view(torch.uint8).numpy().tobytes()
            f.write(raw + b"\0" * (-len(raw) % 64))
            offset += len(raw) + (-len(raw) % 64)
    mapped = np.memmap(path, dtype=np.uint8, mode=mode)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for (m, a, p), off in zip(entries, offsets, strict=True):
            n = p.numel() * p.element_size()
            view = torch.from_numpy(mapped[off : off + n]).view(p.dtype).view(p.shape)
            _set_tensor(m, a, True, view)
    return mapped


def in_file(t, mapped):
    start = mapped.ctypes.data
    return start <= t.data_ptr() < start + mapped.size


@pytest.fixture
def mapped_model(tmp_path):
    model = sm.build_model("tiny", num_layers=6)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    mapped = map_from_file(model, tmp_path / "weights.bin")
    return model, inputs, reference, mapped


def test_file_backed_units_keep_no_slab_and_sample_bit_identically(mapped_model):
    model, inputs, reference, mapped = mapped_model
    engine = make_engine(model, 4, host_memory="file")
    for _ in range(2):
        with engine.attached():
            assert torch.equal(model(**inputs), reference)
            assert torch.equal(model(**inputs), reference)
    assert engine.counters.slabs_built == 0 and engine.counters.slab_bytes_built == 0
    for unit in engine.swapped_units:
        assert unit.in_file and unit.slab is None
        assert all(in_file(t, mapped) for *_, t in unit.tensors()), unit.name  # home: the file, between runs
    assert engine.counters.copies > 0
    assert engine.host.tier_summary(engine.order)["file_units"] == 4


def test_ram_tier_copies_file_backed_units_into_slabs(mapped_model):
    model, inputs, reference, mapped = mapped_model
    engine = make_engine(model, 4, host_memory="ram")
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    assert engine.counters.slabs_built == 4
    assert not any(in_file(t, mapped) for u in engine.swapped_units for *_, t in u.tensors())


def test_auto_keeps_slabs_while_they_fit_the_ram_less_the_reserve(mapped_model, monkeypatch):
    model, inputs, reference, _mapped = mapped_model
    engine = make_engine(model, 4, host_memory="auto")
    size = bm._layout_size(engine.swapped_units[0])
    total = 100 * size
    # Room for two slabs beside the reserve of a quarter of the RAM.
    monkeypatch.setattr(hm, "total_ram", lambda: total)
    monkeypatch.setattr(hm, "available_ram", lambda: total // 4 + 2 * size + 1)
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    assert [u.in_file for u in engine.swapped_units] == [False, False, True, True]
    summary = engine.host.tier_summary(engine.order)
    assert (summary["pageable_units"], summary["file_units"]) == (2, 2)
    assert summary["file_bytes"] == sum(u.nbytes for u in engine.swapped_units[2:])


def test_auto_with_plenty_of_ram_keeps_every_slab(mapped_model, monkeypatch):
    model, inputs, reference, _mapped = mapped_model
    monkeypatch.setattr(hm, "total_ram", lambda: 64 * 2**30)
    monkeypatch.setattr(hm, "available_ram", lambda: 60 * 2**30)
    engine = make_engine(model, 4)  # the default is auto
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    assert engine.counters.slabs_built == 4 and not any(u.in_file for u in engine.swapped_units)


def test_units_whose_bytes_are_not_the_files_get_slabs(tmp_path):
    """Copy-on-write private mappings may hold written pages, and plain RAM tensors have no file: slabs."""
    model = sm.build_model("tiny", num_layers=6)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    map_from_file(model, tmp_path / "w.bin", names={"blocks.4"}, mode="c")
    map_from_file(model, tmp_path / "v.bin", names={"blocks.5"})
    engine = make_engine(model, 3, host_memory="file")
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    assert [(u.name, u.in_file) for u in engine.swapped_units] == [
        ("blocks.3", False),
        ("blocks.4", False),
        ("blocks.5", True),
    ]


def test_a_replaced_weight_moves_into_a_small_slab_of_its_own(mapped_model):
    """A host that re-points a swapped tensor (a patched weight) must not be served the file's bytes."""
    model, inputs, _reference, _mapped = mapped_model
    engine = make_engine(model, 2, host_memory="file")
    engine.park()
    assert engine.swapped_units[1].slab is None  # every tensor a file view: no slab at all
    weight = model.blocks[5].ffn[0].weight
    _set_tensor(model.blocks[5].ffn[0], "weight", True, weight.detach().clone() * 0)  # now plain RAM, zeros
    with engine.attached():
        out = model(**inputs)
        assert torch.count_nonzero(model.blocks[5].ffn[0].weight) == 0  # views its slab again, not the file
    unit = engine.swapped_units[1]
    # Decided again: the replaced weight now lives in the unit's small slab, the rest stays in the file.
    assert unit.in_file and unit.slab is not None and unit.slab.numel() < unit.nbytes
    start = unit.slab.data_ptr()
    assert start <= model.blocks[5].ffn[0].weight.data_ptr() < start + unit.slab.numel()
    assert in_file(model.blocks[5].ffn[2].weight, _mapped)
    expected = sm.build_model("tiny", num_layers=6)
    expected.load_state_dict(model.state_dict())
    assert torch.equal(out, expected(**inputs))


def test_sources_that_are_file_views_are_bound_not_copied(tmp_path):
    """The combined loader hands park() the file tensors of never-filled parameters: left in the file,
    each parameter views its source, read once when it runs."""
    model = sm.build_model("tiny", num_layers=4)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    donor = sm.build_model("tiny", num_layers=4)
    donor.load_state_dict(model.state_dict())
    mapped = map_from_file(donor, tmp_path / "w.bin")
    engine = make_engine(model, 2, host_memory="file")
    swapped = [
        (m, a)
        for u in engine.swapped_units
        for m in u.module.modules()
        for a, p in m._parameters.items()
        if p is not None
    ]
    by_name = dict(donor.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    sources = {id(m._parameters[a]): by_name[names[id(m._parameters[a])]] for m, a in swapped}
    with torch.no_grad():
        for m, a in swapped:
            m._parameters[a].fill_(float("nan"))
    engine.park(sources)
    assert engine.counters.slabs_built == 0
    assert engine.counters.slab_tensors_from_sources == len(sources)
    assert all(in_file(m._parameters[a], mapped) for m, a in swapped)
    with engine.attached():
        assert torch.equal(model(**inputs), reference)


def test_host_memory_input_is_checked():
    model = sm.build_model("tiny", num_layers=2)
    with pytest.raises(ValueError, match="host_memory must be one of auto, ram, file"):
        make_engine(model, 1, host_memory="disk")


# -- the policy, with made-up RAM figures ---------------------------------------------------------


def test_policy_ram_and_file_modes():
    sizes, backed = [10, 10, 10], [True, False, True]
    assert hm.choose_file_tier(sizes, backed, "ram", 0, 100) == [False, False, False]
    assert hm.choose_file_tier(sizes, backed, "file", 10**9, 10**9) == [True, False, True]


def test_policy_auto_counts_only_new_ram_and_leaves_a_quarter_free():
    # 100 total, 55 available: 30 may go to slabs of file-backed units; non-file units cost nothing new.
    sizes, backed = [20, 20, 20, 5], [True, False, True, True]
    assert hm.choose_file_tier(sizes, backed, "auto", 55, 100) == [False, False, True, False]
    assert hm.choose_file_tier(sizes, backed, "auto", 25, 100) == [True, False, True, True]
    assert hm.choose_file_tier(sizes, backed, "auto", None, 100) == [False] * 4  # unknown: as before


def test_pinned_budget_is_capped_below_the_ram_per_os(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(hm.sys, "platform", "linux")
    # ComfyUI's Linux limit (up to 95 % of RAM) is capped at 45 %, less what ComfyUI pinned itself.
    assert hm.capped_pinned_budget(0.95 * 64 * gib, 4 * gib, 64 * gib) == int(64 * gib * 0.45) - 4 * gib
    assert hm.capped_pinned_budget(10 * gib, 4 * gib, 64 * gib) == 6 * gib  # a lower host limit wins
    assert hm.capped_pinned_budget(None, 0, 64 * gib) == int(64 * gib * 0.45)
    assert hm.capped_pinned_budget(10 * gib, 20 * gib, 64 * gib) == 0
    monkeypatch.setattr(hm.sys, "platform", "win32")
    assert hm.capped_pinned_budget(None, 0, 64 * gib) == int(64 * gib * 0.40)


def test_a_host_that_turned_pinning_off_gets_no_pinned_budget():
    """ComfyUI 0.8.1+ sets MAX_PINNED_MEMORY = -1 for --disable-pinned-memory (or a device it does not pin
    for): the pack pins nothing then. A host without the setting (0.3.64) is None: the pack's own cap."""
    gib = 2**30
    assert hm.capped_pinned_budget(-1, 0, 64 * gib) == 0
    assert hm.capped_pinned_budget(0, 0, 64 * gib) == 0
    assert hm.capped_pinned_budget(None, 0, 64 * gib) > 0


MAPS = """\
7f0000000000-7f0000100000 r--s 00001000 08:01 1234 /models/wan.gguf
7f0000100000-7f0000200000 rw-p 00000000 08:01 1235 /models/patched.bin
7f0000200000-7f0000300000 r--p 00002000 08:01 1236 /models/ro.safetensors
7f0000300000-7f0000400000 rw-p 00000000 00:00 0
7f0000400000-7f0000500000 r--s 00000000 08:01 1237 /tmp/gone (deleted)
7f0000500000-7f0000600000 rw-s 00000000 00:05 1238 /dev/nvidia0
7f0000600000-7f0000700000 r--s 00000000 00:19 1239 /dev/shm/torch_1_2
"""


def test_file_mappings_keep_only_bytes_that_are_the_files():
    # Left out: a private writable mapping, anonymous memory, a deleted file, and device or shared-memory
    # files (CUDA's pinned host memory maps /dev/nvidia*; /dev/shm is RAM the OS cannot drop and re-read).
    found = hm.file_mappings(MAPS)
    assert [(m.path, m.offset) for m in found] == [
        ("/models/wan.gguf", 0x1000),
        ("/models/ro.safetensors", 0x2000),
    ]


def test_file_backing_names_the_file_and_offset(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 64)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(mapped[1000:2000])
    path_found, offset = hm.file_backing(t, hm.file_mappings())
    assert path_found == str(path) and offset == 1000
    assert hm.file_backing(t.clone(), hm.file_mappings()) is None  # anonymous RAM
    assert hm.file_backing(t[::2], hm.file_mappings()) is None  # not contiguous


def test_a_unit_with_some_tensors_in_ram_keeps_only_those_in_a_small_slab(tmp_path):
    """As GGUF loads really are: quantized weights and biases are file views, norms were copied into new
    parameters. The file's bytes stay in the file; only the norms get a (small) slab."""
    model = sm.build_model("tiny", num_layers=4)
    inputs = sm.example_inputs(model)
    reference = model(**inputs)
    mapped = map_from_file(model, tmp_path / "w.bin")
    for block in model.blocks:  # the norms back in anonymous RAM, as ComfyUI's loader leaves them
        for module in block.modules():
            for attr, p in module._parameters.items():
                if p is not None and p.dim() == 1 and "norm" in type(module).__name__.lower():
                    _set_tensor(module, attr, True, p.detach().clone())
    engine = make_engine(model, 3, host_memory="file")
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    summary = engine.host.tier_summary(engine.order)
    assert summary["file_units"] == 3 and summary["pageable_units"] == 0
    for unit in engine.swapped_units:
        norms = [
            t for m in unit.module.modules() if "norm" in type(m).__name__.lower() for t in m.parameters()
        ]
        assert norms and unit.slab is not None
        assert unit.slab.numel() < unit.nbytes // 10
        start = unit.slab.data_ptr()
        assert all(start <= t.data_ptr() < start + unit.slab.numel() for t in norms)
        others = [t for *_, t in unit.tensors() if not any(t is n for n in norms)]
        assert others and all(in_file(t, mapped) for t in others)
    assert summary["file_bytes"] + sum(
        sum(
            t.numel() * t.element_size()
            for m in u.module.modules()
            if "norm" in type(m).__name__.lower()
            for t in m.parameters()
        )
        for u in engine.swapped_units
    ) == sum(u.param_bytes() for u in engine.swapped_units)


def test_slabs_of_file_backed_units_need_new_ram_and_auto_leaves_them_in_the_file(mapped_model, monkeypatch):
    """A slab copied from a mapped file frees nothing (the file's pages are page cache): "ram" needs every
    slab in new RAM and refuses with numbers when it is not there; "auto" leaves the units in the file."""
    model, inputs, reference, _mapped = mapped_model
    sizes = [bm._layout_size(u) for u in make_engine(model, 4).swapped_units]
    monkeypatch.setattr(hm, "available_ram", lambda: 3 * max(sizes) // 2)
    monkeypatch.setattr(hm, "total_ram", lambda: 4 * max(sizes))
    with pytest.raises(bm.HostMemoryError, match="Not enough free RAM"):
        make_engine(model, 4, host_memory="ram").park()
    engine = make_engine(model, 4, host_memory="auto")
    with engine.attached():
        assert torch.equal(model(**inputs), reference)
    assert all(u.in_file for u in engine.swapped_units)


def test_progress_counts_units_left_in_files_and_a_callback_set_later(mapped_model, monkeypatch):
    """The combined loader sets the progress callback on an existing engine; units bound to their file
    count as done too, in unit order."""
    model, _inputs, _reference, _mapped = mapped_model
    monkeypatch.setattr(hm, "total_ram", lambda: 100 * 2**20)
    size = bm._layout_size(make_engine(model, 4).swapped_units[0])
    monkeypatch.setattr(hm, "available_ram", lambda: 25 * 2**20 + size + 1)  # one slab, three in the file
    engine = make_engine(model, 4)
    ticks = []
    engine.on_slab_built = lambda done, total: ticks.append((done, total))
    engine.park()
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [u.in_file for u in engine.swapped_units] == [False, True, True, True]


def test_on_a_gpu_only_ram_slabs_are_pinned_and_file_units_stay_unpinned(mapped_model, monkeypatch):
    """FakeCudart: with use_non_blocking a plan pins its RAM slabs and a staging ring for the units left in
    their file; those units pin nothing of their own (their small slabs stay pageable)."""
    runtime = FakeCudart()
    registered = runtime.registered
    monkeypatch.setattr(hm, "_cuda_runtime", lambda: runtime)
    model, _inputs, _reference, _mapped = mapped_model
    for block in model.blocks:  # norms in anonymous RAM: each file unit gets a small slab of its own
        for module in block.modules():
            for attr, p in module._parameters.items():
                if p is not None and "norm" in type(module).__name__.lower():
                    _set_tensor(module, attr, True, p.detach().clone())
    monkeypatch.setattr(hm, "total_ram", lambda: 100 * 2**20)
    size = bm._layout_size(make_engine(model, 4).swapped_units[0])
    monkeypatch.setattr(hm, "available_ram", lambda: 25 * 2**20 + size + 1)
    engine = make_engine(model, 4, compute_device="cuda", use_non_blocking=True, pinned_budget_bytes=2**40)
    engine.park()
    engine.park()  # a second park (every attach) pins nothing more
    units = engine.swapped_units
    assert [u.in_file for u in units] == [False, True, True, True]
    assert all(u.slab is not None for u in units[1:])
    # Pinned: the RAM slab and the staging ring (two buffers of the largest file unit); no small slab.
    ring = engine.host.staging
    assert ring.pinned and ring.count == 2 and ring.size == max(u.nbytes for u in units[1:])
    assert sorted(registered.values()) == sorted([units[0].nbytes, ring.size, ring.size])
    assert set(registered) == {units[0].slab.data_ptr(), *(b.data_ptr() for b in ring.buffers)}
    assert engine.pinned_bytes() == units[0].nbytes + ring.nbytes
    engine.release()
    assert registered == {} and engine.host.staging is None
