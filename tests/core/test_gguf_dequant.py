"""Torch GGUF dequantizers against the numpy reference in the gguf package."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from wan22_blockswap.quant import dequant as gguf_dequant

T = GGMLQuantizationType
NUMPY_WRITABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of the fp16 scale fields (d, dmin) inside one block of each K-quant.
K_SCALE_OFFSETS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
SHAPES = [(256,), (3, 512), (4, 2, 768)]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _random_k_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int) -> np.ndarray:
    """Random K-quant blocks whose fp16 scales are finite and of realistic size."""
    rng = np.random.default_rng(seed)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(-0.02, 0.02, size=n_blocks).astype(np.float16)
        scale[0] = np.float16(3e-6)  # fp16 subnormal: must still decode exactly
        if n_blocks > 1:
            scale[1] = 0.0
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _raw_and_reference(qtype: GGMLQuantizationType, shape: tuple[int, ...], seed: int = 0):
    """(raw uint8 bytes as numpy, reference float32 values of `shape`) for one tensor."""
    n_elements = int(np.prod(shape))
    if qtype in K_QUANTS:
        block_size = GGML_QUANT_SIZES[qtype][0]
        raw = _random_k_blocks(qtype, n_elements // block_size, seed)
    else:
        rng = np.random.default_rng(seed)
        values = rng.standard_normal(shape).astype(np.float32) * 0.05
        raw = np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8)
    reference = quants.dequantize(raw.reshape(-1), qtype).reshape(shape)
    assert np.isfinite(reference).all()
    return raw, reference


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("qtype", NUMPY_WRITABLE + K_QUANTS, ids=lambda t: t.name)
def test_float32_output_is_bit_identical_to_numpy_reference(qtype, shape):
    raw, reference = _raw_and_reference(qtype, shape, seed=len(shape))
    got = gguf_dequant.dequantize(torch.from_numpy(raw), qtype, shape, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert got.shape == torch.Size(shape)
    expected = torch.from_numpy(np.ascontiguousarray(reference))
    # Compare bit patterns: equal floats are not enough to prove the same rounding everywhere.
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "qtype", [T.Q8_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K, T.BF16, T.F16], ids=lambda t: t.name
)
def test_half_outputs_are_the_reference_rounded_once(qtype, dtype):
    raw, reference = _raw_and_reference(qtype, (2, 512), seed=7)
    got = gguf_dequant.dequantize(torch.from_numpy(raw), qtype, (2, 512), dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, torch.from_numpy(reference).to(dtype))


def test_default_output_dtype_is_float16():
    raw, reference = _raw_and_reference(T.Q8_0, (64,))
    got = gguf_dequant.dequantize(torch.from_numpy(raw), T.Q8_0, (64,))
    assert got.dtype == torch.float16
    assert torch.equal(got, torch.from_numpy(reference).half())


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q3_K, T.Q5_K], ids=lambda t: t.name)
def test_q_values_land_in_the_right_positions(qtype):
    # Mixing raw layouts (flat, 2-D, 3-D) must not change how bytes map to elements.
    raw, reference = _raw_and_reference(qtype, (4, 256), seed=3)
    flat = torch.from_numpy(raw.reshape(-1))
    reshaped = flat.view(2, 2, -1)
    a = gguf_dequant.dequantize(flat, qtype, (4, 256), dtype=torch.float32)
    b = gguf_dequant.dequantize(reshaped, qtype, (1024,), dtype=torch.float32)
    assert torch.equal(a, torch.from_numpy(reference))
    assert torch.equal(b, a.reshape(-1))
    # Rows are independent: decoding one row's bytes alone gives that row.
    row_bytes = raw.reshape(4, -1)[2]
    row = gguf_dequant.dequantize(torch.from_numpy(row_bytes.copy()), qtype, (256,), dtype=torch.float32)
    assert torch.equal(row, a[2])


def test_float_types_return_a_copy_not_a_view_of_raw():
    values = torch.randn(8, 16)
    raw = values.view(torch.uint8).clone()
    out = gguf_dequant.dequantize(raw, T.F32, (8, 16), dtype=torch.float32)
    assert torch.equal(out, values)
    out.zero_()
    assert torch.equal(raw.view(torch.float32), values)


def test_non_contiguous_raw_is_decoded_in_logical_order():
    raw, reference = _raw_and_reference(T.Q8_0, (4, 64), seed=5)
    row_bytes = torch.from_numpy(raw).reshape(4, -1)
    width = row_bytes.shape[1]
    wide = torch.zeros(4, 2 * width, dtype=torch.uint8)
    wide[:, :width] = row_bytes
    strided = wide[:, :width]
    assert not strided.is_contiguous()
    got = gguf_dequant.dequantize(strided, T.Q8_0, (4, 64), dtype=torch.float32)
    assert torch.equal(got, torch.from_numpy(reference))


def test_every_supported_type_has_a_dequantizer():
    expected = set(NUMPY_WRITABLE + K_QUANTS)
    assert set(gguf_dequant.SUPPORTED_TYPES) == expected
    assert set(gguf_dequant.DEQUANTIZERS) == expected
    assert all(gguf_dequant.is_supported(t) for t in expected)
    assert gguf_dequant.is_supported(int(T.Q4_K))


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.Q8_1, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_raises_value_error_naming_it(qtype):
    assert not gguf_dequant.is_supported(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = torch.zeros(type_size, dtype=torch.uint8)
    with pytest.raises(ValueError, match=qtype.name):
        gguf_dequant.dequantize(raw, qtype, (block_size,))


def test_unknown_type_number_is_unsupported():
    assert not gguf_dequant.is_supported(9999)
    with pytest.raises(ValueError, match="9999"):
        gguf_dequant.dequantize(torch.zeros(4, dtype=torch.uint8), 9999, (4,))


def test_byte_count_mismatch_is_rejected():
    with pytest.raises(ValueError, match="needs 68 bytes"):
        gguf_dequant.dequantize(torch.zeros(70, dtype=torch.uint8), T.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="block size"):
        gguf_dequant.dequantize(torch.zeros(34, dtype=torch.uint8), T.Q8_0, (30,))


def test_non_uint8_raw_is_rejected():
    with pytest.raises(TypeError, match="uint8"):
        gguf_dequant.dequantize(torch.zeros(17, dtype=torch.int16), T.Q8_0, (32,))


@CUDA
@pytest.mark.parametrize("qtype", NUMPY_WRITABLE + K_QUANTS, ids=lambda t: t.name)
def test_cuda_result_is_bit_identical_to_numpy_reference(qtype):
    raw, reference = _raw_and_reference(qtype, (8, 1024), seed=11)
    got = gguf_dequant.dequantize(torch.from_numpy(raw).cuda(), qtype, (8, 1024), dtype=torch.float32)
    assert got.is_cuda
    assert torch.equal(got.cpu().view(torch.int32), torch.from_numpy(reference).view(torch.int32))
