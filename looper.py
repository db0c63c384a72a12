"""WanVideoLooper integration: the high/low expert pair and the LoRA sequence, swapped as a team.

The looper (SquirrelRat/WanVideoLooper) samples high, (high,) low per segment through
`nodes.common_ksampler`, with text/vision/VAE work in between and no unload of its own. Both nodes here
reuse the BlockSwap integration (`callbacks.apply_block_swap`): per-run hooks, true accounting, LoRA on
swapped layers. What they add:

- the high experts and the low experts are rivals (`callbacks.make_rivals`): before one samples, the
  other's resident weights are unloaded through ComfyUI's loaded-model list, so each expert may keep as
  many blocks resident as the whole grant allows instead of both having to fit side by side;
- models that share a diffusion module (LoRA clones of one model, the same model in several segments)
  share one plan, so one set of host copies, built once, serves all of them.
"""

from __future__ import annotations

from .callbacks import apply_block_swap, make_rivals, plan_of
from .config import SwapConfig

SEQUENCE_ENTRY = "(model_high or None, model_low or None, clip or None)"


def _is_model(value) -> bool:
    """A ComfyUI MODEL (a ModelPatcher): what the looper's sequence holds for its experts."""
    return (
        hasattr(value, "model") and callable(getattr(value, "clone", None)) and hasattr(value, "load_device")
    )


def _plans(models) -> list:
    return [p for p in (plan_of(m) for m in models if m is not None) if p is not None]


def swap_pair(model_high, model_low, config: SwapConfig):
    """(model_high, model_low) with block swapping, taking turns in VRAM. Either may be None."""
    for name, value in (("model_high", model_high), ("model_low", model_low)):
        if value is not None and not _is_model(value):
            raise ValueError(f"{name} must be a MODEL (got {type(value).__name__})")
    shared: dict = {}
    high = apply_block_swap(model_high, config, shared) if model_high is not None else None
    low = apply_block_swap(model_low, config, shared) if model_low is not None else None
    make_rivals(_plans([high]), _plans([low]))
    return high, low


def check_sequence(sequence) -> None:
    """Refuse what WanVideoLooper could not use, naming the position and what was found."""
    if not isinstance(sequence, list):
        raise ValueError(
            f"model_clip_sequence must be a list of {SEQUENCE_ENTRY} tuples, as WanVideo Lora Sequencer "
            f"outputs (got {type(sequence).__name__})"
        )
    for i, entry in enumerate(sequence):
        if entry is None:
            continue
        if not isinstance(entry, tuple) or len(entry) != 3:
            shape = f"a tuple of {len(entry)}" if isinstance(entry, tuple) else type(entry).__name__
            raise ValueError(f"model_clip_sequence[{i}] must be a tuple {SEQUENCE_ENTRY} (got {shape})")
        for j, role in ((0, "model_high"), (1, "model_low")):
            if entry[j] is not None and not _is_model(entry[j]):
                raise ValueError(
                    f"model_clip_sequence[{i}] holds {type(entry[j]).__name__} where its {role} (a MODEL or "
                    "None) belongs"
                )


def swap_sequence(sequence, config: SwapConfig):
    """The same sequence with every model replaced by its swapped clone; clips and None untouched."""
    if sequence is None:
        return None
    check_sequence(sequence)
    shared: dict = {}
    out, highs, lows = [], [], []
    for entry in sequence:
        if entry is None:
            out.append(None)
            continue
        model_high, model_low, clip = entry
        high = apply_block_swap(model_high, config, shared) if model_high is not None else None
        low = apply_block_swap(model_low, config, shared) if model_low is not None else None
        highs.append(high)
        lows.append(low)
        out.append((high, low, clip))
    make_rivals(_plans(highs), _plans(lows))
    return out
