"""Tiny WAN checkpoints, random conditioning and sampling through a real ComfyUI (imported here)."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import comfy.model_detection
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.sd
import torch
from safetensors.torch import save_file

from wan22_blockswap import callbacks
from wan22_blockswap.bench import synthetic_model

TEXT_DIM = 4096
# Variants built from our synthetic model (real ComfyUI key names), and the extra trigger keys that
# ComfyUI's model detection looks for in the others (their remaining weights come from the class
# ComfyUI instantiates for them).
SYNTHETIC = {
    "t2v": ("t2v", {}),
    "i2v": ("i2v", {"in_dim": 36}),
    "vace": ("vace", {}),
    "5b": ("t2v", {"in_dim": 48, "out_dim": 48}),
    "camera": ("i2v", {"in_dim": 32}),
    "s2v": ("t2v", {}),
    "humo": ("t2v", {}),
    "animate": ("i2v", {"in_dim": 36}),
}
LATENT_CHANNELS = {"5b": 48}
USES_CLIP = {"i2v", "camera", "animate"}


def _trigger_keys(variant: str, dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    if variant == "camera":
        return {"control_adapter.conv.weight": r(dim, 24 * 64, 2, 2)}
    if variant == "s2v":
        return {"casual_audio_encoder.encoder.final_linear.weight": r(dim, dim)}
    if variant == "humo":
        return {"audio_proj.audio_proj_glob_1.layer.bias": torch.zeros(dim)}
    if variant == "animate":
        return {"face_adapter.fuser_blocks.0.k_norm.weight": torch.ones(128)}
    return {}


def checkpoint_state_dict(
    variant: str, num_layers: int = 4, dim: int = 128, seed: int = 0, ffn_dim: int | None = None
) -> dict:
    base, shape_changes = SYNTHETIC[variant]
    if variant == "animate":
        num_layers = max(num_layers, 5)  # its face adapter has num_layers // 5 fuser blocks
    shape = dataclasses.replace(
        synthetic_model.PRESETS["tiny"],
        dim=dim,
        num_heads=max(1, dim // 128),
        num_layers=num_layers,
        **shape_changes,
    )
    model = synthetic_model.build_model(shape, base, seed=seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    sd.update(_trigger_keys(variant, dim, g))
    if variant in ("t2v", "i2v", "vace", "5b"):
        return sd
    # Complete the rest from the model class ComfyUI detects for these keys.
    config = comfy.model_detection.model_config_from_unet(sd, "")
    config.set_inference_dtype(torch.float32, None)
    full = {}
    for key, value in config.get_model({}, "").diffusion_model.state_dict().items():
        if key in sd and sd[key].shape == value.shape:
            full[key] = sd[key]
        elif value.ndim == 1 and "norm" in key and key.endswith("weight"):
            full[key] = torch.ones(value.shape)
        else:
            full[key] = torch.randn(value.shape, generator=g) * 0.02
    return full


def write_checkpoint(tmp_path: Path, variant: str, **kwargs) -> Path:
    path = tmp_path / f"tiny_wan_{variant}.safetensors"
    save_file(checkpoint_state_dict(variant, **kwargs), str(path))
    return path


def load(path: Path, **model_options):
    return comfy.sd.load_diffusion_model(str(path), model_options=model_options)


def conditioning(seed: int, tokens: int = 8, clip: bool = False):
    g = torch.Generator().manual_seed(seed)
    extras = {}
    if clip:
        extras["clip_vision_output"] = types.SimpleNamespace(
            penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g)
        )
    return [[torch.randn(1, tokens, TEXT_DIM, generator=g), extras]]


def sample(
    model,
    variant: str = "t2v",
    steps: int = 3,
    cfg: float = 2.0,
    seed: int = 0,
    frames: int = 1,
    size: int = 8,
    callback=None,
):
    latent = torch.zeros(1, LATENT_CHANNELS.get(variant, 16), frames, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    clip = variant in USES_CLIP
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        "euler",
        "simple",
        conditioning(seed + 1, clip=clip),
        conditioning(seed + 2, clip=clip),
        latent,
        disable_pbar=True,
        seed=seed,
        callback=callback,
    )


def count_forwards(patcher) -> list[int]:
    """Counts diffusion-model forward calls of runs of this patcher (a test-only wrapper)."""
    calls: list[int] = []

    def counter(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_counter", counter)
    return calls


def plan(patcher) -> callbacks.SwapPlan:
    return callbacks.plan_of(patcher)


def expected_bytes(p: callbacks.SwapPlan, passes: int) -> int:
    """Bytes the engine must have copied for `passes` forward passes (plus the wrapped prefetch)."""
    units = p.engine.swapped_units
    per_pass = sum(u.nbytes for u in units)
    if len(units) <= p.engine.num_slots():
        return per_pass  # everything fits in the slots: copied once per run
    return per_pass * passes + sum(u.nbytes for u in units[: p.engine.prefetch_blocks])


def fp8_scaled_state_dict(state_dict: dict) -> dict:
    """A state dict in the fp8_scaled format of ComfyUI's WAN 2.2 fp8 files: each block linear weight in
    float8_e4m3fn with its per-layer `scale_weight`, and the `scaled_fp8` marker."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / 448.0  # e4m3fn's largest value
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            out[key] = value
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_fp8_scaled_checkpoint(tmp_path: Path, variant: str = "t2v", **kwargs) -> Path:
    path = tmp_path / f"tiny_wan_{variant}_fp8_scaled.safetensors"
    save_file(fp8_scaled_state_dict(checkpoint_state_dict(variant, **kwargs)), str(path))
    return path
