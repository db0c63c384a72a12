"""ComfyUI layer classes for GGUF weights (``custom_operations`` of ``comfy.sd.load_diffusion_model_state_dict``).

A layer whose weight (or bias) is a :class:`GGUFWeight` keeps the raw quantized bytes as its parameter. In
``forward`` the bytes go to the compute device, are dequantized there, LoRA patches stored on the weight
(``weight.patches``: a list of ``(patch_list, key)``, set by :class:`loader.WanGGUFModelPatcher` or by the
BlockSwap engine for swapped blocks) are applied with ``comfy.lora.calculate_weight``, and the result is cast
to the compute dtype. Layers without GGUF weights are ComfyUI's ``manual_cast`` layers, unchanged.

Covers what WAN models build: Linear, Conv1d/2d/3d, LayerNorm, GroupNorm, RMSNorm and Embedding.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import torch
import torch.nn.functional as F

from .reader import is_gguf_weight

log = logging.getLogger(__name__)

# ComfyUI's per-forward LoRA function for offloaded layers (an empty tuple matches nothing).
_LOWVRAM_PATCH = getattr(comfy.model_patcher, "LowVramPatch", ())

# A callback per assigned GGUF tensor while a loader is loading (progress reporting); thread-local so
# that two loads in parallel threads do not report into each other's bar.
_load_state = threading.local()


class load_progress:
    """Context manager: call ``tick()`` for each state-dict tensor a GGUF layer takes while inside."""

    def __init__(self, tick: Callable[[], None]):
        self.tick = tick

    def __enter__(self):
        self.previous = getattr(_load_state, "tick", None)
        _load_state.tick = self.tick
        return self

    def __exit__(self, *exc):
        _load_state.tick = self.previous
        return False


def _tick() -> None:
    tick = getattr(_load_state, "tick", None)
    if tick is not None:
        tick()


def has_gguf_weights(module: torch.nn.Module) -> bool:
    return is_gguf_weight(getattr(module, "weight", None)) or is_gguf_weight(getattr(module, "bias", None))


def _materialize(
    tensor: torch.Tensor,
    functions: list,
    dtype: torch.dtype | None,
    device: torch.device,
    non_blocking: bool,
) -> torch.Tensor:
    """``tensor`` as a float tensor of ``dtype`` on ``device``, with its LoRA patches and weight functions."""
    if is_gguf_weight(tensor):
        raw = tensor.to(device, non_blocking=non_blocking)  # the bytes, moved as bytes
        patches = tensor.patches
        if patches:
            # LoRA math in float32 on a private copy (calculate_weight works in place), then one rounding.
            weight = raw.dequantize(torch.float32)
            for patch_list, key in patches:
                weight = comfy.lora.calculate_weight(
                    patch_list, weight, key, intermediate_dtype=torch.float32
                )
            # ComfyUI may also attach its per-forward LoRA function (LowVramPatch) to a layer it offloads:
            # the patches on the weight already are that LoRA.
            functions = [f for f in functions if not isinstance(f, _LOWVRAM_PATCH)]
            weight = weight.to(dtype) if dtype is not None else weight
        else:
            weight = raw.dequantize(dtype or torch.float32)
    else:
        weight = comfy.model_management.cast_to(
            tensor, dtype, device, non_blocking=non_blocking, copy=len(functions) > 0
        )
    for function in functions:
        weight = function(weight)
    return weight


def cast_gguf_bias_weight(
    module: torch.nn.Module,
    input: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    bias_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``comfy.ops.cast_bias_weight`` for layers holding GGUF tensors: (weight, bias) ready for the op."""
    if input is not None:
        dtype = input.dtype if dtype is None else dtype
        device = input.device if device is None else device
    bias_dtype = dtype if bias_dtype is None else bias_dtype
    non_blocking = comfy.model_management.device_supports_non_blocking(device)
    weight = bias = None
    if getattr(module, "weight", None) is not None:
        weight = _materialize(module.weight, module.weight_function, dtype, device, non_blocking)
    if getattr(module, "bias", None) is not None:
        bias = _materialize(module.bias, module.bias_function, bias_dtype, device, non_blocking)
    return weight, bias


class GGUFLayer:
    """Mixed in front of a ComfyUI ``manual_cast`` layer: loads GGUF tensors as they are, decodes in forward."""

    comfy_cast_weights = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gguf_model_dtype = kwargs.get("dtype")  # the dtype ComfyUI built the model in

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        quantized = {}
        for name in ("weight", "bias"):
            value = state_dict.get(prefix + name)
            if is_gguf_weight(value):
                quantized[name] = value
        if not quantized:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            if prefix + "weight" in state_dict:
                _tick()
            return
        # Plain tensors of this layer load the ComfyUI way; the quantized ones are taken as they are.
        local = {
            prefix + name: state_dict[prefix + name]
            for name in [*self._parameters, *self._buffers]
            if name not in quantized and prefix + name in state_dict
        }
        super()._load_from_state_dict(
            local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name, value in quantized.items():
            current = getattr(self, name, None)
            expected = tuple(torch.Tensor.size(current)) if current is not None else None
            if expected is not None and tuple(value.tensor_shape) != expected:
                error_msgs.append(
                    f"size mismatch for {prefix}{name}: the GGUF tensor has shape {tuple(value.tensor_shape)} "
                    f"({value.tensor_type.name}), the model expects {expected}"
                )
                continue
            setattr(self, name, torch.nn.Parameter(value, requires_grad=False))
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        _tick()

    def forward_comfy_cast_weights(self, input, *args, **kwargs):
        if not has_gguf_weights(self):
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        return self.forward_gguf(input, *args, **kwargs)

    def forward_gguf(self, input, *args, **kwargs):  # pragma: no cover - every layer class defines it
        raise NotImplementedError


def _layer(base: type, forward_gguf: Callable) -> type:
    namespace = {
        "forward_gguf": forward_gguf,
        "__module__": __name__,
        "__qualname__": f"GGUFOps.{base.__name__}",
    }
    return type(base.__name__, (GGUFLayer, base), namespace)


def _linear(self, input):
    weight, bias = cast_gguf_bias_weight(self, input)
    return F.linear(input, weight, bias)


def _conv(self, input, **kwargs):
    weight, bias = cast_gguf_bias_weight(self, input)
    return self._conv_forward(input, weight, bias, **kwargs)


def _layer_norm(self, input):
    weight, bias = cast_gguf_bias_weight(self, input)
    return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)


def _group_norm(self, input):
    weight, bias = cast_gguf_bias_weight(self, input)
    return F.group_norm(input, self.num_groups, weight, bias, self.eps)


def _rms_norm(self, input):
    weight, _ = cast_gguf_bias_weight(self, input)
    return F.rms_norm(input, tuple(weight.shape), weight, self.eps)


def _embedding(self, input, out_dtype=None):
    dtype = out_dtype or self.gguf_model_dtype or torch.float32
    weight, _ = cast_gguf_bias_weight(self, device=input.device, dtype=dtype)
    out = F.embedding(
        input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
    )
    return out if out_dtype is None else out.to(out_dtype)


_FORWARDS = {
    "Linear": _linear,
    "Conv1d": _conv,
    "Conv2d": _conv,
    "Conv3d": _conv,
    "LayerNorm": _layer_norm,
    "GroupNorm": _group_norm,
    "RMSNorm": _rms_norm,
    "Embedding": _embedding,
}


class GGUFOps(comfy.ops.manual_cast):
    """Operations for ``model_options["custom_operations"]``: ComfyUI's manual_cast plus GGUF weights.

    Layer types not listed in ``_FORWARDS`` (ConvTranspose, ...) are ComfyUI's and take float weights only.
    """


for _name, _forward in _FORWARDS.items():
    _base = getattr(comfy.ops.manual_cast, _name, None)
    if _base is not None:
        setattr(GGUFOps, _name, _layer(_base, _forward))
del _name, _forward, _base
