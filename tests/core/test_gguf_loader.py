"""GGUFWeight behaviour and WAN GGUF loading/writing."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from wan22_blockswap.bench.gguf_writer import write_wan_gguf
from wan22_blockswap.quant import reader as gguf_loader
from wan22_blockswap.quant.reader import GGUFWeight, load_gguf_state_dict

T = GGMLQuantizationType
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DIM, FFN, IN_CH = 64, 128, 16


def _q8_weight(rows: int = 4, cols: int = 32, seed: int = 0) -> GGUFWeight:
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(values, T.Q8_0))
    return GGUFWeight(raw, tensor_type=T.Q8_0, tensor_shape=(rows, cols))


def _assert_same_gguf_attrs(a: GGUFWeight, b: GGUFWeight) -> None:
    assert type(b) is GGUFWeight
    assert b.tensor_type == a.tensor_type
    assert b.tensor_shape == a.tensor_shape
    assert b.patches == a.patches


def _wan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-block WAN 2.1-shaped state dict (ComfyUI key names), small dims."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    sd = {
        "patch_embedding.weight": r(DIM, IN_CH, 1, 2, 2),
        "patch_embedding.bias": r(DIM),
        "text_embedding.0.weight": r(DIM, 64),
        "time_embedding.0.weight": r(DIM, 32),
        "time_projection.1.weight": r(DIM * 6, DIM),
        "blocks.0.modulation": r(1, 6, DIM),
        "blocks.0.norm3.weight": r(DIM),
        "blocks.0.self_attn.q.weight": r(DIM, DIM),
        "blocks.0.self_attn.k.weight": r(DIM, DIM),
        "blocks.0.self_attn.v.weight": r(DIM, DIM),
        "blocks.0.self_attn.o.weight": r(DIM, DIM),
        "blocks.0.self_attn.norm_q.weight": r(DIM),
        "blocks.0.cross_attn.q.weight": r(DIM, DIM),
        "blocks.0.ffn.0.weight": r(FFN, DIM),
        "blocks.0.ffn.0.bias": r(FFN),
        "blocks.0.ffn.2.weight": r(DIM, FFN),
        "head.head.weight": r(IN_CH * 4, DIM),
        "head.modulation": r(1, 2, DIM),
    }
    return sd


WAN_QTYPES = {
    "blocks.0.self_attn.q.weight": T.Q8_0,
    "blocks.0.self_attn.k.weight": T.Q4_0,
    "blocks.0.self_attn.v.weight": T.Q5_1,
    "blocks.0.self_attn.o.weight": T.F16,
    "blocks.0.cross_attn.q.weight": T.BF16,
    "blocks.0.ffn.0.weight": T.Q8_0,
    "blocks.0.ffn.2.weight": T.Q4_0,
    "head.head.weight": T.F16,
    # Quantized requests for tensors real files keep in float: the writer must keep them.
    "blocks.0.modulation": T.Q8_0,
    "blocks.0.norm3.weight": T.Q8_0,
    "patch_embedding.weight": T.Q8_0,
    "text_embedding.0.weight": T.Q8_0,
}


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "wan_tiny.gguf"
    sd = _wan_state_dict()
    written = write_wan_gguf(path, sd, WAN_QTYPES, metadata={"wan.test_marker": "tiny"})
    return path, sd, written


# ----------------------------------------------------------------------------- GGUFWeight


def test_gguf_weight_shape_is_raw_and_tensor_shape_is_logical():
    w = _q8_weight(4, 64)
    assert w.dtype == torch.uint8
    assert w.shape == torch.Size([4, 68])
    assert w.tensor_shape == torch.Size([4, 64])
    assert w.untyped_storage().nbytes() == 4 * 68


def test_to_cpu_and_pin_like_moves_keep_attributes():
    w = _q8_weight()
    w.patches.append(("lora", 1.0))
    for moved in (w.to("cpu", copy=True), w.cpu(), w.to(device="cpu", dtype=torch.uint8, copy=True)):
        _assert_same_gguf_attrs(w, moved)
        assert torch.equal(moved.as_subclass(torch.Tensor), w.as_subclass(torch.Tensor))


def test_to_a_float_dtype_is_refused_instead_of_corrupting_bytes():
    with pytest.raises(TypeError, match="dequantize"):
        _q8_weight().to(torch.float16)


def test_clone_is_a_real_copy_with_its_own_patch_list():
    w = _q8_weight()
    c = w.clone()
    _assert_same_gguf_attrs(w, c)
    assert c.data_ptr() != w.data_ptr()
    c.as_subclass(torch.Tensor).zero_()
    assert w.as_subclass(torch.Tensor).any()
    c.patches.append("p")
    assert w.patches == []


def test_detach_aliases_the_bytes_and_keeps_attributes():
    w = _q8_weight()
    d = w.detach()
    _assert_same_gguf_attrs(w, d)
    assert d.data_ptr() == w.data_ptr()


def test_new_empty_and_empty_like_keep_attributes_for_raw_bytes():
    w = _q8_weight()
    e = w.new_empty(w.shape)
    _assert_same_gguf_attrs(w, e)
    assert e.shape == w.shape and e.dtype == torch.uint8
    _assert_same_gguf_attrs(w, torch.empty_like(w))
    assert type(w.new_empty((3,), dtype=torch.float32)) is torch.Tensor


def test_slices_and_views_are_plain_tensors():
    w = _q8_weight()
    assert type(w[1:]) is torch.Tensor
    assert type(w.view(-1)) is torch.Tensor


def test_deepcopy_keeps_attributes_and_copies_bytes():
    w = _q8_weight()
    w.patches.append(["patch"])
    c = copy.deepcopy(w)
    _assert_same_gguf_attrs(w, c)
    assert c.data_ptr() != w.data_ptr()
    assert c.patches[0] is not w.patches[0]


def test_dequantize_returns_logical_values_and_ignores_patches():
    values = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    raw = gguf.quants.quantize(values, T.Q8_0)
    w = GGUFWeight(torch.from_numpy(raw), tensor_type=T.Q8_0, tensor_shape=(4, 32), patches=["ignored"])
    expected = torch.from_numpy(gguf.quants.dequantize(raw, T.Q8_0))
    out = w.dequantize()
    assert type(out) is torch.Tensor and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(w.dequantize(torch.bfloat16), expected.bfloat16())


def test_parameter_data_rebinding_keeps_object_class_and_attributes():
    w = _q8_weight(4, 64)
    w.patches.append("lora")
    param = torch.nn.Parameter(w, requires_grad=False)
    assert isinstance(param, torch.nn.Parameter) and isinstance(param, GGUFWeight)
    module = torch.nn.Linear(64, 4, bias=False)
    module.weight = param
    before = id(param)

    slot = torch.zeros(1024, dtype=torch.uint8)
    view = slot[256 : 256 + 4 * 68].view(4, 68)
    view.copy_(w.as_subclass(torch.Tensor))
    param.data = view  # how the swap engine binds a parameter to its GPU slot

    assert id(module.weight) == before and module.weight is param
    assert type(param) is GGUFWeight
    assert param.tensor_type == T.Q8_0 and param.tensor_shape == torch.Size([4, 64])
    assert param.patches == ["lora"]
    assert param.data_ptr() == view.data_ptr()
    assert torch.equal(param.dequantize(), w.dequantize())
    # .data reads back as a GGUFWeight too
    _assert_same_gguf_attrs(param, param.data)


def test_module_dtype_casts_leave_raw_bytes_alone():
    module = torch.nn.Linear(32, 4)
    w = _q8_weight()
    module.weight = torch.nn.Parameter(w, requires_grad=False)
    module.to(torch.float16)
    assert module.bias.dtype == torch.float16
    assert type(module.weight) is GGUFWeight and module.weight.dtype == torch.uint8
    assert torch.equal(module.weight.dequantize(), w.dequantize())


@CUDA
def test_cuda_round_trip_keeps_attributes_and_bytes():
    w = _q8_weight()
    g = w.cuda()
    _assert_same_gguf_attrs(w, g)
    assert g.is_cuda
    _assert_same_gguf_attrs(w, g.to("cuda", non_blocking=True))
    assert torch.equal(g.dequantize().cpu(), w.dequantize())
    back = g.cpu()
    _assert_same_gguf_attrs(w, back)
    pinned = w.pin_memory()
    _assert_same_gguf_attrs(w, pinned)
    assert pinned.is_pinned()


# ----------------------------------------------------------------------------- loading


def test_round_trip_restores_types_shapes_and_values(wan_file):
    path, sd, written = wan_file
    loaded, meta = load_gguf_state_dict(path)
    assert set(loaded) == set(sd)

    # What real WAN GGUF files keep unquantized stays unquantized.
    assert written["blocks.0.modulation"] == T.F32
    assert written["blocks.0.norm3.weight"] == T.F32
    assert written["patch_embedding.weight"] == T.F32
    assert written["text_embedding.0.weight"] == T.F16
    assert written["time_projection.1.weight"] == T.F16  # not in WAN_QTYPES: default F16

    tolerances = {T.Q8_0: 0.002, T.Q5_1: 0.006, T.Q4_0: 0.02}
    for name, original in sd.items():
        tensor, qtype = loaded[name], written[name]
        if qtype in tolerances:
            assert type(tensor) is GGUFWeight, name
            assert tensor.tensor_type == qtype and tensor.tensor_shape == original.shape, name
            values = tensor.dequantize(torch.float32)
            err = (values - original).abs().max().item()
            assert err < tolerances[qtype], (name, err)
            assert err > 0, name  # really quantized, not stored as floats
        else:
            assert type(tensor) is torch.Tensor, name
            assert tensor.shape == original.shape, name
            expected = {T.F32: original, T.F16: original.half(), T.BF16: original.bfloat16()}[qtype]
            assert tensor.dtype == expected.dtype, name
            assert torch.equal(tensor, expected), name


def test_five_dim_patch_embedding_is_restored_from_metadata(wan_file):
    path, sd, _ = wan_file
    reader = gguf.GGUFReader(path)
    stored = next(t for t in reader.tensors if t.name == "patch_embedding.weight")
    assert len(stored.shape) == 4  # GGUF can't hold 5 dims
    field = reader.get_field("comfy.gguf.orig_shape.patch_embedding.weight")
    assert field is not None and field.types[-1] == gguf.GGUFValueType.INT32
    loaded, _ = load_gguf_state_dict(path)
    assert loaded["patch_embedding.weight"].shape == torch.Size([DIM, IN_CH, 1, 2, 2])
    assert torch.equal(loaded["patch_embedding.weight"], sd["patch_embedding.weight"])


def test_metadata_reports_architecture_file_type_and_tensor_types(wan_file):
    path, _, written = wan_file
    _, meta = load_gguf_state_dict(path)
    assert meta["general.architecture"] == "wan"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert meta["gguf.file_type_name"] == "MOSTLY_Q8_0"
    assert meta["wan.test_marker"] == "tiny"
    assert meta["gguf.tensor_types"]["Q4_0"] == sum(1 for t in written.values() if t == T.Q4_0)
    assert not any(k.startswith("comfy.gguf.orig_shape") for k in meta)


def test_loaded_tensors_are_views_of_one_file_map_not_copies(wan_file):
    path, _, _ = wan_file
    loaded, _ = load_gguf_state_dict(path)
    offsets = {t.name: t.data_offset for t in gguf.GGUFReader(path).tensors}
    first = min(offsets, key=offsets.get)
    base = loaded[first].data_ptr()
    # Copies would be separate allocations; views sit at the file's own tensor offsets.
    for name, offset in offsets.items():
        assert loaded[name].data_ptr() - base == offset - offsets[first], name
    w = loaded["blocks.0.self_attn.q.weight"]
    assert w.untyped_storage().nbytes() == 64 * 68  # byte accounting sees exactly its bytes


def test_loading_emits_no_numpy_writable_warning(wan_file, recwarn):
    path, _, _ = wan_file
    load_gguf_state_dict(path)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_k_quant_weights_written_as_raw_bytes_load_back(tmp_path):
    rng = np.random.default_rng(4)
    tensors = {}
    for i, qtype in enumerate([T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]):
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(2, type_size), dtype=np.uint8)
        raw[:, -2:] = np.full((2, 1), 0.01, dtype=np.float16).view(np.uint8)  # Q3_K/Q6_K: d
        raw[:, :4] = np.full((2, 2), 0.01, dtype=np.float16).view(np.uint8)  # Q4_K/Q5_K: d, dmin
        raw[:, 80:84] = np.full((2, 2), 0.01, dtype=np.float16).view(np.uint8)  # Q2_K: d, dmin
        tensors[f"blocks.{i}.ffn.0.weight"] = GGUFWeight(
            torch.from_numpy(raw), tensor_type=qtype, tensor_shape=(2, block_size)
        )
    path = tmp_path / "kquants.gguf"
    write_wan_gguf(path, tensors, {})
    loaded, _ = load_gguf_state_dict(path)
    for name, w in tensors.items():
        got = loaded[name]
        assert got.tensor_type == w.tensor_type and got.tensor_shape == w.tensor_shape
        assert torch.equal(got.as_subclass(torch.Tensor).reshape(-1), w.as_subclass(torch.Tensor).reshape(-1))
        ref = gguf.quants.dequantize(w.as_subclass(torch.Tensor).numpy(), w.tensor_type)
        assert torch.equal(got.dequantize(), torch.from_numpy(ref).reshape(2, -1))


def test_callable_qtype_policy_is_used(tmp_path):
    sd = {"blocks.0.ffn.0.weight": torch.randn(8, 64), "blocks.0.ffn.0.bias": torch.randn(8)}
    path = tmp_path / "policy.gguf"
    written = write_wan_gguf(path, sd, lambda name, t: T.Q5_0)
    assert written == {"blocks.0.ffn.0.weight": T.Q5_0, "blocks.0.ffn.0.bias": T.F32}
    loaded, _ = load_gguf_state_dict(path)
    assert loaded["blocks.0.ffn.0.weight"].tensor_type == T.Q5_0


def test_writer_refuses_types_numpy_cannot_quantize(tmp_path):
    with pytest.raises(ValueError, match="Q4_K"):
        write_wan_gguf(
            tmp_path / "k.gguf",
            {"blocks.0.ffn.0.weight": torch.randn(4, 256)},
            {"blocks.0.ffn.0.weight": T.Q4_K},
        )


# ----------------------------------------------------------------------------- bad files


def test_other_architecture_is_rejected_naming_file_and_architecture(tmp_path):
    path = tmp_path / "llm.gguf"
    write_wan_gguf(path, {"blk.0.attn_q.weight": torch.randn(4, 32)}, {}, arch="llama")
    with pytest.raises(ValueError, match=r"llm\.gguf.*'llama'"):
        load_gguf_state_dict(path)


def test_unsupported_quant_type_is_rejected_naming_tensor_and_type(tmp_path):
    block_size, type_size = GGML_QUANT_SIZES[T.IQ4_NL]
    raw = torch.randint(0, 256, (2, type_size), dtype=torch.uint8)
    iq = GGUFWeight(raw, tensor_type=T.IQ4_NL, tensor_shape=(2, block_size))
    path = tmp_path / "iq.gguf"
    write_wan_gguf(path, {"blocks.0.ffn.2.weight": iq, "head.head.weight": torch.randn(4, 32)}, {})
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.2\.weight.*IQ4_NL"):
        load_gguf_state_dict(path)


def test_missing_file_raises_file_not_found_with_the_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_gguf_state_dict(missing)


def test_non_gguf_file_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_gguf_state_dict(path)


def test_empty_file_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf"):
        load_gguf_state_dict(path)


@pytest.mark.parametrize("keep", [0.5, 0.98, 24 / 1000], ids=["half", "last_bytes", "header"])
def test_truncated_gguf_is_rejected_naming_the_file(wan_file, tmp_path, keep):
    path, _, _ = wan_file
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_gguf_state_dict(cut)


def test_loader_module_has_no_comfyui_import():
    source = Path(gguf_loader.__file__).read_text()
    assert "import comfy" not in source and "from comfy" not in source


# --------------------------------------------------------------------------------------------
# Damaged headers: bounded by the file's size before gguf's reader parses anything
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_hang():
    """Turns a parse that loops (the failure these tests are about) into a test failure after 20 s."""
    import signal

    def stop(*_):
        raise AssertionError("the load did not finish within 20 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _layout(path: Path):
    """(reader, position of a part in the file) of a GGUF file, to aim damage at its fields."""
    r = gguf.GGUFReader(path, "r")
    return r, lambda part: part.ctypes.data - r.data.ctypes.data


def _patch(path: Path, out: Path, pos: int, fmt: str, value: int) -> Path:
    import struct

    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, pos, value)
    out.write_bytes(bytes(data))
    return out


@pytest.fixture
def orig_shape_file(tmp_path):
    """A WAN file with a metadata array (the 5-D patch embedding's orig_shape)."""
    path = tmp_path / "wan.gguf"
    write_wan_gguf(path, _wan_state_dict(), {"blocks.0.self_attn.q.weight": T.Q8_0})
    return path


def test_a_metadata_array_length_past_the_end_is_refused_without_looping(orig_shape_file, tmp_path, no_hang):
    reader, pos = _layout(orig_shape_file)
    field = reader.fields[gguf_loader.ORIG_SHAPE_KEY + "patch_embedding.weight"]
    bad = _patch(orig_shape_file, tmp_path / "bad.gguf", pos(field.parts[4]), "<Q", 2**62)
    with pytest.raises(ValueError, match=r"bad\.gguf.*metadata array of 4611686018427387904 entries"):
        load_gguf_state_dict(bad)


@pytest.mark.parametrize("which", ["tensor_count", "kv_count"])
def test_counts_the_file_cannot_hold_are_refused(orig_shape_file, tmp_path, which, no_hang):
    reader, pos = _layout(orig_shape_file)
    bad = _patch(
        orig_shape_file, tmp_path / "bad.gguf", pos(reader.fields[f"GGUF.{which}"].parts[0]), "<Q", 2**40
    )
    with pytest.raises(
        ValueError, match=r"bad\.gguf: its header announces .* more than its \d+ bytes can hold"
    ):
        load_gguf_state_dict(bad)


def test_dims_that_multiply_past_the_file_are_refused(orig_shape_file, tmp_path, no_hang):
    reader, pos = _layout(orig_shape_file)
    t = next(t for t in reader.tensors if t.name == "blocks.0.ffn.0.weight")
    bad = _patch(orig_shape_file, tmp_path / "bad.gguf", pos(t.field.parts[3]), "<Q", 2**32)
    with pytest.raises(ValueError, match=r"bad\.gguf: tensor 'blocks\.0\.ffn\.0\.weight' .* past the end"):
        load_gguf_state_dict(bad)


@pytest.mark.parametrize("offset", ["misaligned", "overlapping"])
def test_tensor_offsets_that_break_the_layout_are_refused(orig_shape_file, tmp_path, offset, no_hang):
    reader, pos = _layout(orig_shape_file)
    second = reader.tensors[1]
    start = second.data_offset - reader.data_offset
    value = start + 4 if offset == "misaligned" else 0  # 0: the first tensor's bytes
    bad = _patch(orig_shape_file, tmp_path / "bad.gguf", pos(second.field.parts[5]), "<Q", value)
    with pytest.raises(ValueError, match=rf"bad\.gguf: tensor '{second.name}' starts at byte offset {value}"):
        load_gguf_state_dict(bad)


def test_a_last_tensor_type_that_shrinks_it_is_refused(orig_shape_file, tmp_path, no_hang):
    reader, pos = _layout(orig_shape_file)
    last = reader.tensors[-1]
    assert last.tensor_type == T.F16 and last.n_elements % 32 == 0
    bad = _patch(orig_shape_file, tmp_path / "bad.gguf", pos(last.field.parts[4]), "<I", int(T.Q8_0))
    with pytest.raises(ValueError, match=r"bad\.gguf: its tensors end at byte \d+ but the file has \d+"):
        load_gguf_state_dict(bad)


# --------------------------------------------------------------------------------------------
# Files written by gguf's writer as it is, without the orig_shape convention
# --------------------------------------------------------------------------------------------


def _write_plain_gguf(path: Path, sd: dict[str, torch.Tensor], **int_arrays: list[int]) -> Path:
    """`sd` as F32 tensors through GGUFWriter with no reshaping: a 5-D array is written as 5 dims."""
    writer = gguf.GGUFWriter(str(path), "wan")
    for key, values in int_arrays.items():
        writer.add_array(key.replace("__", "."), values)
    for name, tensor in sd.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_five_dim_tensor_written_by_gguf_as_it_is_loads_as_gguf_reads_it(tmp_path):
    """gguf's writer stores a 5-D array as 5 dims and its reader reads them back; so must we."""
    sd = _wan_state_dict()
    path = _write_plain_gguf(tmp_path / "five_dims.gguf", sd)
    (stored,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "patch_embedding.weight"]
    assert len(stored.shape) == 5  # what the bounds used to refuse
    loaded, _ = load_gguf_state_dict(path)
    assert loaded.keys() == sd.keys()
    for name, tensor in sd.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["patch_embedding.weight"].shape == (DIM, IN_CH, 1, 2, 2)


def test_a_dimension_count_past_the_end_is_still_refused(tmp_path, no_hang):
    sd = _wan_state_dict()
    path = _write_plain_gguf(tmp_path / "five_dims.gguf", sd)
    reader, pos = _layout(path)
    t = next(t for t in reader.tensors if t.name == "patch_embedding.weight")
    bad = _patch(path, tmp_path / "bad.gguf", pos(t.field.parts[2]), "<I", 2**31)
    with pytest.raises(ValueError, match=r"bad\.gguf.*the shape of tensor 'patch_embedding\.weight'"):
        load_gguf_state_dict(bad)


@pytest.mark.parametrize("orig", [[-DIM, -IN_CH, 1, 2, 2], [DIM, IN_CH, 1, 2, -4]], ids=["two", "one"])
def test_a_negative_orig_shape_dimension_is_refused_naming_file_and_tensor(tmp_path, orig):
    sd = _wan_state_dict()
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"].reshape(DIM * IN_CH, 1, 2, 2)
    path = _write_plain_gguf(tmp_path / "negative.gguf", sd, **{ORIG_KEY: orig})
    with pytest.raises(
        ValueError,
        match=rf"negative\.gguf: tensor 'patch_embedding\.weight': .*orig_shape\.patch_embedding\.weight = "
        rf"\({orig[0]}, .*has a negative dimension",
    ):
        load_gguf_state_dict(path)


ORIG_KEY = (gguf_loader.ORIG_SHAPE_KEY + "patch_embedding.weight").replace(".", "__")
