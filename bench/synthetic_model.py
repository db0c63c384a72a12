"""A WAN-shaped transformer in plain torch, with ComfyUI's parameter names and shapes.

Used by the tests (tiny sizes, and as a source of checkpoints that ComfyUI's own loader accepts)
and by the benchmark (real 1.3B/5B/14B block shapes with random weights). The forward pass does the
work of a WAN block (modulated LayerNorm, self-attention with RMS-normed q/k, cross-attention to the
text context, GELU FFN) so timings and memory behave like the real model; it is not numerically
the ComfyUI model (no RoPE, simplified time embedding).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class WanShape:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)


PRESETS: dict[str, WanShape] = {
    # Shapes of the released WAN 2.1/2.2 transformers (design.md section 2).
    "1.3b": WanShape(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "5b": WanShape(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    "14b": WanShape(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # The CPU default of test_performance.py: 1.3B's depth (so the default blocks_to_swap=20 means the same
    # share of blocks) with narrow blocks, so a 2-core machine runs the whole path in seconds.
    "small": WanShape(dim=512, ffn_dim=1536, num_heads=4, num_layers=30),
    # Test sizes: load through comfy.sd and sample on a CPU in well under a second.
    "tiny": WanShape(dim=128, ffn_dim=256, num_heads=2, num_layers=4),
}


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, lq, d = q.shape
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, d)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, image_kv: bool = False):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)
        if image_kv:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, img_len: int = 0) -> torch.Tensor:
        source = x if context is None else context[:, img_len:]
        out = _attention(self.norm_q(self.q(x)), self.norm_k(self.k(source)), self.v(source), self.heads)
        if img_len and hasattr(self, "k_img"):
            image = context[:, :img_len]
            k_img = self.norm_k_img(self.k_img(image))
            out = out + _attention(self.norm_q(self.q(x)), k_img, self.v_img(image), self.heads)
        return self.o(out)


class WanBlock(nn.Module):
    def __init__(self, shape: WanShape, image_kv: bool = False):
        super().__init__()
        dim = shape.dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, shape.num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = SelfAttention(dim, shape.num_heads, image_kv=image_kv)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, shape.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(shape.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, img_len: int = 0
    ) -> torch.Tensor:
        e = (self.modulation.to(x.dtype) + e).chunk(6, dim=1)
        y = self.self_attn(self.norm1(x) * (1 + e[1]) + e[0])
        x = x + y * e[2]
        x = x + self.cross_attn(self.norm3(x), context, img_len)
        y = self.ffn(self.norm2(x) * (1 + e[4]) + e[3])
        return x + y * e[5]


class VaceBlock(WanBlock):
    def __init__(self, shape: WanShape, block_id: int):
        super().__init__(shape)
        self.block_id = block_id
        if block_id == 0:
            self.before_proj = nn.Linear(shape.dim, shape.dim)
        self.after_proj = nn.Linear(shape.dim, shape.dim)

    def forward(self, c, x, e, context):
        if self.block_id == 0:
            c = self.before_proj(c) + x
        c = super().forward(c, e, context)
        return self.after_proj(c), c


class Head(nn.Module):
    def __init__(self, shape: WanShape):
        super().__init__()
        self.norm = nn.LayerNorm(shape.dim, eps=1e-6, elementwise_affine=False)
        self.head = nn.Linear(
            shape.dim, shape.out_dim * shape.patch_size[0] * shape.patch_size[1] * shape.patch_size[2]
        )
        self.modulation = nn.Parameter(torch.randn(1, 2, shape.dim) / shape.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        e = (self.modulation.to(x.dtype) + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + e[1]) + e[0])


class MLPProj(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(1280), nn.Linear(1280, 1280), nn.GELU(), nn.Linear(1280, dim), nn.LayerNorm(dim)
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


class SyntheticWanModel(nn.Module):
    """variant: "t2v", "i2v" (image cross-attention + img_emb) or "vace" (VACE side blocks)."""

    def __init__(self, shape: WanShape, variant: str = "t2v", vace_layers: int = 0):
        super().__init__()
        if variant not in ("t2v", "i2v", "vace"):
            raise ValueError(f"variant must be 't2v', 'i2v' or 'vace' (got {variant!r})")
        self.shape = shape
        dim = shape.dim
        self.patch_embedding = nn.Conv3d(
            shape.in_dim, dim, kernel_size=shape.patch_size, stride=shape.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(shape.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(shape.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            WanBlock(shape, image_kv=variant == "i2v") for _ in range(shape.num_layers)
        )
        self.head = Head(shape)
        self.img_emb = MLPProj(dim) if variant == "i2v" else None
        if variant == "vace":
            vace_layers = vace_layers or max(1, shape.num_layers // 2)
            self.vace_blocks = nn.ModuleList(VaceBlock(shape, i) for i in range(vace_layers))
            step = shape.num_layers // vace_layers
            self.vace_layers_mapping = {i * step: i for i in range(vace_layers)}
            self.vace_patch_embedding = nn.Conv3d(
                shape.in_dim * 6, dim, kernel_size=shape.patch_size, stride=shape.patch_size
            )

    def forward(
        self,
        tokens: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        vace_tokens: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """tokens: (B, L, dim) already patch-embedded; t: (B,); context: (B, Lc, text_dim)."""
        half = self.shape.freq_dim // 2
        freqs = torch.exp(-torch.arange(half, device=t.device, dtype=torch.float32) * (9.21 / half))
        sinus = t.float()[:, None] * freqs[None]
        e = self.time_embedding(torch.cat([sinus.cos(), sinus.sin()], dim=1).to(tokens.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.shape.dim))
        context = self.text_embedding(context)
        img_len = 0
        if clip_fea is not None and self.img_emb is not None:
            context = torch.cat([self.img_emb(clip_fea), context], dim=1)
            img_len = clip_fea.shape[1]
        x = tokens
        mapping = getattr(self, "vace_layers_mapping", {})
        c = list(vace_tokens) if vace_tokens is not None else []
        x_orig = x
        for i, block in enumerate(self.blocks):
            x = block(x, e0, context, img_len)
            j = mapping.get(i)
            if j is not None and c:
                for k in range(len(c)):
                    skip, c[k] = self.vace_blocks[j](c[k], x_orig, e0, context)
                    x = x + skip
        return self.head(x, e)


def build_model(
    preset: str | WanShape = "tiny",
    variant: str = "t2v",
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    init_device: torch.device | str | None = None,
) -> SyntheticWanModel:
    """A synthetic WAN model with deterministic random weights, in eval mode, without gradients.

    Weights are drawn on `init_device` (default: `device`): drawing a 14B model's 28 GB on a GPU and
    copying it to RAM takes seconds, drawing it on the CPU minutes.
    """
    shape = PRESETS[preset] if isinstance(preset, str) else preset
    if num_layers is not None:
        shape = dataclasses.replace(shape, num_layers=num_layers)
    with torch.device("meta"):
        model = SyntheticWanModel(shape, variant)
    model = model.to(dtype).to_empty(device=device)
    randomize_(model, seed, init_device or device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, init_device: torch.device | str) -> None:
    """Fill every tensor with values of a trained model's scale (so activations stay finite)."""
    g = torch.Generator(device=init_device).manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        values = torch.randn(t.shape, generator=g, device=init_device, dtype=torch.float32)
        if t.dim() >= 2 and not name.endswith("modulation"):
            values /= max(1, t[0].numel()) ** 0.5  # 1/sqrt(fan_in)
        elif name.endswith("modulation"):
            values /= t.shape[-1] ** 0.5
        elif "norm" in name and name.endswith("weight"):
            values = 1 + 0.1 * values
        else:
            values *= 0.02
        t.copy_(values)


def example_inputs(
    model: SyntheticWanModel,
    tokens: int = 64,
    text_tokens: int = 16,
    batch: int = 1,
    seed: int = 1,
    vace_contexts: int = 1,
) -> dict[str, object]:
    """Inputs for one forward pass on the model's device and dtype."""
    param = model.time_embedding[0].weight
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(param.device, param.dtype)

    dim = model.shape.dim
    inputs: dict[str, object] = {
        "tokens": rand(batch, tokens, dim),
        "t": torch.full((batch,), 500.0, device=param.device),
        "context": rand(batch, text_tokens, model.shape.text_dim),
    }
    if model.img_emb is not None:
        inputs["clip_fea"] = rand(batch, 257, 1280)
    if hasattr(model, "vace_blocks"):
        inputs["vace_tokens"] = [rand(batch, tokens, dim) for _ in range(vace_contexts)]
    return inputs
