"""Where a swapped unit's tensors go in a buffer: one layout serves its host slab and every device slot.

Pure torch, no ComfyUI import. Used by the engine (slots) and by the host tiers (slabs, staging).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# Offsets of tensors inside a slab (and the identical slot layout) are rounded up to this, so every
# view starts where the CUDA caching allocator would start a fresh tensor: kernels see the same
# alignment as with the unswapped model and produce bit-identical results.
TENSOR_ALIGNMENT = 256


def _align(n: int, alignment: int = TENSOR_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain torch.Tensor aliasing t's storage, whatever subclass t is.

    Quantized tensor subclasses (GGUF) override shape, .to() or copy_; the engine moves their raw
    bytes, so it looks at the storage through a plain alias.
    """
    with torch._C.DisableTorchFunctionSubclass():
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        return alias.set_(t.untyped_storage(), t.storage_offset(), torch.Tensor.size(t), t.stride())


def is_wrapper_tensor(t: torch.Tensor) -> bool:
    """A wrapper tensor subclass (comfy_kitchen's QuantizedTensor for fp8_scaled / mixed-precision
    weights): it reports a logical dtype and shape while its bytes live in inner tensors that
    ``__tensor_flatten__`` names. Its own "storage" is not its data: never alias or copy it directly."""
    return is_traceable_wrapper_subclass(t)


def inner_tensors(t: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    """The plain tensors that hold t's bytes: (None, t) for an ordinary tensor, one entry per inner
    tensor of a wrapper subclass."""
    if not is_wrapper_tensor(t):
        return [(None, t)]
    names, _ctx = t.__tensor_flatten__()
    return [(name, getattr(t, name)) for name in names]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes t really occupies (a wrapper's inner tensors, not its logical dtype and shape)."""
    return sum(torch.Tensor.numel(part) * part.element_size() for _, part in inner_tensors(t))


def _set_tensor(owner: nn.Module, attr: str, is_param: bool, value: torch.Tensor) -> None:
    """Point a parameter or buffer at new storage without replacing the Parameter object.

    Keeping the object keeps everything that refers to it valid (optimizers don't matter here, but
    ComfyUI's accounting, LoRA backups and tensor-subclass attributes such as a GGUF quant type do).
    A wrapper subclass has no storage of its own to re-point: the wrapper built around the new inner
    views takes the old one's place.
    """
    if not is_param:
        owner._buffers[attr] = value
    elif is_wrapper_tensor(value):
        owner._parameters[attr] = value
    else:
        owner._parameters[attr].data = value


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """One plain tensor's bytes inside a slab (and inside any device slot)."""

    name: str | None  # the inner tensor's attribute in a wrapper subclass; None for a plain tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one parameter or buffer of a unit lives inside its slab (and inside any device slot).

    A plain tensor is one byte range; a wrapper subclass is one range per inner tensor, plus what its
    ``__tensor_unflatten__`` needs to build the same wrapper around views of them.
    """

    owner: nn.Module
    attr: str
    is_param: bool
    ranges: tuple[ByteRange, ...]
    wrapper: tuple[type, object, torch.Size, tuple[int, ...]] | None = None  # (class, ctx, size, stride)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)


@dataclasses.dataclass(eq=False)
class SwapUnit:
    """One module the engine manages: a transformer block, a VACE block, an embedding."""

    name: str
    module: nn.Module
    swapped: bool
    layout: list[TensorSpec] = dataclasses.field(default_factory=list)
    nbytes: int = 0  # slab size including alignment padding
    slab: torch.Tensor | None = None  # uint8 host buffer, built on first attach
    slab_views: list[torch.Tensor] = dataclasses.field(default_factory=list)
    slab_pinned: bool = False
    pin_failed: bool = False  # CUDA refused to pin this slab: do not try again at every attach
    # No slab: the unit's tensors are views of a file mapping (slab_views holds them) and are copied
    # into a slot straight from there (the host memory tier "file").
    in_file: bool = False

    def tensors(self) -> Iterator[tuple[nn.Module, str, bool, torch.Tensor]]:
        """Every parameter and buffer of the unit, once each, with its owning module."""
        for module in self.module.modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    yield module, attr, True, p
            for attr, b in module._buffers.items():
                if b is not None:
                    yield module, attr, False, b

    def param_bytes(self) -> int:
        return sum(tensor_nbytes(t) for *_, t in self.tensors())


def bind(unit: SwapUnit, views: list[torch.Tensor]) -> None:
    """Point each of the unit's tensors at its view (into a slab, a staging buffer or a slot)."""
    for spec, view in zip(unit.layout, views, strict=True):
        _set_tensor(spec.owner, spec.attr, spec.is_param, view)


def _layout(tensors: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> tuple[list[TensorSpec], int]:
    """Where each tensor goes in a slab (and in any slot), and the slab's size."""
    layout, offset = [], 0
    for owner, attr, is_param, t in tensors:
        ranges = []
        for name, part in inner_tensors(t):
            nbytes = torch.Tensor.numel(part) * part.element_size()
            ranges.append(ByteRange(name, offset, nbytes, part.dtype, torch.Tensor.size(part), part.stride()))
            offset = _align(offset + nbytes)
        wrapper = None
        if is_wrapper_tensor(t):
            _names, ctx = t.__tensor_flatten__()
            wrapper = (type(t), ctx, t.size(), t.stride())
        layout.append(TensorSpec(owner, attr, is_param, tuple(ranges), wrapper))
    return layout, offset


def _layout_size(unit: SwapUnit) -> int:
    """The unit's slab size, also before its slab exists (a host reserves slot memory at load time)."""
    return unit.nbytes or _layout(list(unit.tensors()))[1]


def _range_view(buffer: torch.Tensor, r: ByteRange) -> torch.Tensor:
    raw = buffer[r.offset : r.offset + r.nbytes]
    return raw.view(r.dtype).as_strided(r.shape, r.stride)


def _view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor `spec` describes, with its bytes in `buffer` (a slab or a slot)."""
    if spec.wrapper is None:
        return _range_view(buffer, spec.ranges[0])
    cls, ctx, size, stride = spec.wrapper
    inner = {r.name: _range_view(buffer, r) for r in spec.ranges}
    rebuilt = cls.__tensor_unflatten__(inner, ctx, size, stride)
    if spec.is_param:
        # What nn.Parameter(wrapper) marks; Parameter() itself would detach, and a wrapper's detach may
        # copy its inner tensors (QuantizedTensor clones its scale) out of the slab.
        rebuilt._is_param = True
    return rebuilt


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain aliases of the tensors that hold t's bytes (see `inner_tensors`)."""
    return [plain_tensor(part) for _, part in inner_tensors(t)]


def _check_movable(unit: SwapUnit) -> None:
    """Refuse, before anything is touched, a tensor whose bytes the engine cannot move: a wrapper
    subclass whose inner tensors are wrappers again."""
    for owner, attr, _, t in unit.tensors():
        for name, part in inner_tensors(t):
            if name is not None and is_wrapper_tensor(part):
                raise ValueError(
                    f"{unit.name}: {type(owner).__name__}.{attr} is a {type(t).__name__} whose inner tensor "
                    f"{name!r} is itself a {type(part).__name__}: the engine cannot swap this layout; keep "
                    "this block resident (fewer blocks_to_swap) or load the model in another format"
                )


def _check_views_alias(unit: SwapUnit, buffer: torch.Tensor) -> None:
    """Every rebuilt view must keep its bytes in `buffer`; a wrapper that copies its inner tensors when it
    is rebuilt would silently read stale data from elsewhere."""
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for spec, view in zip(unit.layout, unit.slab_views, strict=True):
        if not all(start <= leaf.data_ptr() < end for leaf in _leaves(view)):
            raise ValueError(
                f"{unit.name}: {type(spec.owner).__name__}.{spec.attr} ({type(view).__name__}) does not keep "
                "its bytes in the views it is rebuilt from, so it cannot be swapped; keep this block resident"
            )


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src's bytes into dst (same layout), tensor by inner tensor, without any subclass logic."""
    for to, frm in zip(_leaves(dst), _leaves(src), strict=True):
        to.copy_(frm)
