"""Torch dequantizers for the GGML weight types found in WAN GGUF files.

One function per block type takes the raw bytes as an ``(n_blocks, type_size)`` uint8 tensor and
returns ``(n_blocks, block_size)`` float32 values (the float types F32/F16/BF16 return a view in
their own dtype). They are vectorised torch code, so they run on whatever device the bytes are on
(CPU or CUDA); :func:`dequantize` calls them on large slices of blocks (a few per weight), never
per block.

Exactness: the numpy reference (``gguf.quants.dequantize``) computes in float32, and so do we,
with the same operations in the same order. In every supported type each product is exact in
float32 (an fp16 scale has an 11-bit significand, the integer factors have at most 13 bits
between them), so at most one rounding happens per element, and it is the same one the reference
does. Results are therefore bit-identical to the reference in float32, on CPU and CUDA, for all
supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
(given finite scale fields; inf/NaN scales decode to inf/NaN, NaN payloads unchecked). Float16
and bfloat16 outputs are that float32 result rounded once, i.e. the reference's output converted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256

Dequantizer = Callable[[torch.Tensor], torch.Tensor]


def _f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Read the fp16 scale stored at ``offset`` of every block, as an (n_blocks, 1) float32."""
    # A 2-byte column of a (n, type_size) tensor is strided; copy it so it can be viewed as fp16.
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


# Unpacking uses scalar shifts and torch.stack: on CPU a shift by a broadcast tensor of shift
# amounts takes a slow non-vectorised path (~10x slower); on GPU both are cheap uint8 kernels.


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """4-bit values: per group of ``width`` bytes, all low nibbles, then all high ones.

    Returns (n, groups, 2, width) uint8.
    """
    q = qs.reshape(qs.shape[0], groups, width)
    return torch.stack([q & 0x0F, q >> 4], dim=2)


def _crumbs(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """2-bit values at shifts 0, 2, 4, 6 of every byte: (n, groups, 4, width) uint8."""
    q = qs.reshape(qs.shape[0], groups, width)
    return torch.stack([q & 3, (q >> 2) & 3, (q >> 4) & 3, q >> 6], dim=2)


def _bits(qh: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Bit k of every byte, for k = 0..7: (n, groups, 8, width) uint8."""
    q = qh.reshape(qh.shape[0], groups, width)
    return torch.stack([(q >> k) & 1 for k in range(8)], dim=2)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    q = _nibbles(blocks[:, 2:], 1, 16).reshape(n, 32).to(torch.float32)
    return q.sub_(8.0).mul_(d)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _nibbles(blocks[:, 4:], 1, 16).reshape(n, 32).to(torch.float32)
    return q.mul_(d).add_(m)


def _q5_values(blocks: torch.Tensor, qh_offset: int) -> torch.Tensor:
    n = blocks.shape[0]
    # qh is a little-endian uint32 whose bit i is the 5th bit of value i: byte i // 8, bit i % 8.
    qh = _bits(blocks[:, qh_offset : qh_offset + 4], 1, 4).transpose(-1, -2).reshape(n, 32)
    ql = _nibbles(blocks[:, qh_offset + 4 :], 1, 16).reshape(n, 32)
    return ql | (qh << 4)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_field(blocks, 0)
    q = _q5_values(blocks, 2).to(torch.float32)
    return q.sub_(16.0).mul_(d)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_field(blocks, 0)
    m = _f16_field(blocks, 2)
    q = _q5_values(blocks, 4).to(torch.float32)
    return q.mul_(d).add_(m)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16_field(blocks, 0)
    return blocks[:, 2:].view(torch.int8).to(torch.float32).mul_(d)


def dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d = _f16_field(blocks, 80)
    dmin = _f16_field(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    q = _crumbs(blocks[:, 16:80], 2, 32).reshape(n, 16, 16).to(torch.float32)
    return q.mul_(dl).sub_(ml).view(n, QK_K)


def dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16_field(blocks, 108)
    # 16 six-bit scales: low 4 bits from bytes 96..103 (both nibbles), high 2 bits from 104..107.
    low = _nibbles(blocks[:, 96:104], 1, 8).reshape(n, 16)
    high = _crumbs(blocks[:, 104:108], 1, 4).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).view(n, 16, 1)
    ql = _crumbs(blocks[:, 32:96], 2, 32).reshape(n, 16, 16).to(torch.int8)
    # A set hmask bit means "no offset"; a clear one subtracts 4.
    qh = (_bits(blocks[:, :32], 1, 32).reshape(n, 16, 16) ^ 1).to(torch.int8)
    q = (ql - (qh << 2)).to(torch.float32)
    return q.mul_(dl).view(n, QK_K)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte field of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins."""
    n = packed.shape[0]
    packed = packed.reshape(n, 3, 4)
    d, m, m_d = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)
    dmin = _f16_field(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return (d * sc).view(n, 8, 1), (dmin * mn).view(n, 8, 1)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    q = _nibbles(blocks[:, 16:], 4, 32).reshape(n, 8, 32).to(torch.float32)
    return q.mul_(dl).sub_(ml).view(n, QK_K)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks)
    ql = _nibbles(blocks[:, 48:], 4, 32).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48], 1, 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return q.mul_(dl).sub_(ml).view(n, QK_K)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16_field(blocks, 208)
    dl = (d * scales).view(n, 16, 1)
    ql = _nibbles(blocks[:, :128], 2, 64).reshape(n, 8, 32)
    qh = _crumbs(blocks[:, 128:192], 2, 32).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).to(torch.float32)
    return q.view(n, 16, 16).mul_(dl).view(n, QK_K)


def _dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


def _dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16)


def _dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.bfloat16)


T = GGMLQuantizationType

# Float types return their own dtype (converted once, at the end); block types return float32.
DEQUANTIZERS: dict[GGMLQuantizationType, Dequantizer] = {
    T.F32: _dequantize_f32,
    T.F16: _dequantize_f16,
    T.BF16: _dequantize_bf16,
    T.Q4_0: dequantize_q4_0,
    T.Q4_1: dequantize_q4_1,
    T.Q5_0: dequantize_q5_0,
    T.Q5_1: dequantize_q5_1,
    T.Q8_0: dequantize_q8_0,
    T.Q2_K: dequantize_q2_k,
    T.Q3_K: dequantize_q3_k,
    T.Q4_K: dequantize_q4_k,
    T.Q5_K: dequantize_q5_k,
    T.Q6_K: dequantize_q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(DEQUANTIZERS)

_FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

# Elements decoded per step. CPU: float32 temporaries that stay cache-sized, with few enough steps that
# Python overhead stays small. GPU: few launches, ~64 MiB of float32 scratch at most.
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 24


def _chunk_elements(device: torch.device) -> int:
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS


def _as_qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType | None:
    try:
        return GGMLQuantizationType(qtype)
    except ValueError:
        return None


def _type_name(qtype: GGMLQuantizationType | int) -> str:
    known = _as_qtype(qtype)
    return known.name if known is not None else f"unknown GGML type {int(qtype)}"


def is_supported(qtype: GGMLQuantizationType | int) -> bool:
    """Whether :func:`dequantize` can decode this GGML type."""
    return _as_qtype(qtype) in SUPPORTED_TYPES


def is_quantized(qtype: GGMLQuantizationType | int) -> bool:
    """True for block-quantized types (everything but F32/F16/BF16)."""
    return _as_qtype(qtype) not in _FLOAT_TYPES


def dequantize(
    raw: torch.Tensor,
    qtype: GGMLQuantizationType | int,
    logical_shape: Sequence[int],
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Decode the raw bytes of a GGML tensor into a ``logical_shape`` tensor of ``dtype``.

    ``raw`` is the tensor's bytes as uint8, any shape, on any device; the result is on the same
    device and never shares memory with ``raw`` (which may be a read-only file mapping).
    """
    known = _as_qtype(qtype)
    if known not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
        raise ValueError(f"GGUF tensor type {_type_name(qtype)} is not supported (supported: {supported})")
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw GGUF data must be a uint8 tensor, got {raw.dtype}")

    shape = torch.Size(int(s) for s in logical_shape)
    n_elements = math.prod(shape)
    block_size, type_size = GGML_QUANT_SIZES[known]
    if n_elements % block_size != 0:
        raise ValueError(
            f"{known.name} tensor of shape {tuple(shape)} has {n_elements} elements, "
            f"not a multiple of the block size {block_size}"
        )
    n_blocks = n_elements // block_size
    if raw.numel() != n_blocks * type_size:
        raise ValueError(
            f"{known.name} tensor of shape {tuple(shape)} needs {n_blocks * type_size} bytes, "
            f"got {raw.numel()}"
        )

    # Subclasses (GGUFWeight) would route every op below through __torch_function__.
    flat = raw.as_subclass(torch.Tensor) if type(raw) is not torch.Tensor else raw
    blocks = flat.contiguous().view(n_blocks, type_size)
    decode = DEQUANTIZERS[known]
    if known in _FLOAT_TYPES:
        values = decode(blocks).reshape(shape)
        # Same dtype: .to() would return a view of raw's memory, which may be a read-only map.
        return values.clone() if values.dtype == dtype else values.to(dtype)

    # Decode in chunks into the output: the float32 intermediates stay small (cache-sized on
    # CPU, bounded VRAM on GPU) instead of several full-size temporaries per weight.
    out = torch.empty((n_blocks, block_size), dtype=dtype, device=blocks.device)
    step = max(1, _chunk_elements(blocks.device) // block_size)
    for start in range(0, n_blocks, step):
        out[start : start + step].copy_(decode(blocks[start : start + step]))
    return out.view(shape)
