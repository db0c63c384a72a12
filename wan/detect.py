"""WAN version and variant from a state dict's keys and shapes (and file metadata). No ComfyUI, no torch.

The rules follow ComfyUI's own model detection (comfy/model_detection.py, comfy/supported_models.py), so
what this module reports is what ComfyUI will build:

- a WAN diffusion model has ``head.modulation``; ``dim`` is its last size, ``out_dim`` is
  ``head.head.weight``'s rows / 4 (patch 1x2x2), ``in_dim`` is ``patch_embedding.weight``'s input channels;
- the variant comes from the first trigger key present, in ComfyUI's order: ``vace_patch_embedding`` (VACE),
  ``control_adapter.conv`` (camera), ``casual_audio_encoder`` (S2V), ``audio_proj`` (HuMo),
  ``face_adapter`` (Animate); otherwise ``img_emb`` or 36 input channels (WAN 2.2 I2V A14B has no CLIP
  image embedding) make it i2v, and everything else is t2v;
- WAN 2.2 is recognisable from the weights only where its architecture differs from 2.1: the 5B TI2V
  model (48-channel latent, ``out_dim`` 48), and the 2.2-only releases S2V, Animate and Fun Camera without
  ``img_emb``. The A14B high-noise/low-noise files have the 2.1 14B architecture: only file metadata can
  tell them apart from 2.1, and both load the same way.

Shapes are logical (torch order): for GGUF weights pass their ``tensor_shape``; :func:`logical_shapes`
does that for any state dict.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

from ..config import check_choice

WAN_VERSIONS = ("auto", "2.1", "2.2")
MODEL_VARIANTS = ("auto", "t2v", "i2v", "vace", "camera", "s2v", "humo", "animate")

# (trigger key, variant, what it is), in the order ComfyUI checks them.
VARIANT_TRIGGERS: tuple[tuple[str, str, str], ...] = (
    ("vace_patch_embedding.weight", "vace", "VACE patch embedding"),
    ("control_adapter.conv.weight", "camera", "camera control adapter"),
    ("casual_audio_encoder.encoder.final_linear.weight", "s2v", "speech-to-video audio encoder"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "humo", "HuMo audio projection"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "animate", "Animate face adapter"),
)
# Variants ComfyUI 0.33+ knows that this loader's model_variant input has no name for.
OTHER_TRIGGERS: tuple[tuple[str, str, str], ...] = (
    ("patch_embedding_mask.weight", "scail2", "SCAIL2 mask embedding"),
    ("patch_embedding_pose.weight", "scail", "SCAIL pose embedding"),
    ("patch_embedding_global.weight", "wandancer", "WanDancer global embedding"),
)
IMG_EMB_KEY = "img_emb.proj.0.bias"
I2V_IN_DIM = 36
WAN22_LATENT_CHANNELS = 48
SIZE_NAMES = {1536: "1.3B", 3072: "5B", 5120: "14B"}

# Metadata fields that may name the model ("Wan2.2-T2V-A14B", "wan2.1_i2v_480p", ...).
_NAME_FIELDS = (
    "wan.version",
    "general.name",
    "general.basename",
    "general.finetune",
    "general.description",
    "modelspec.title",
    "modelspec.architecture",
    "modelspec.description",
)
_VERSION_IN_NAME = re.compile(r"wan[\s_\-.]*v?2[._\-]?([12])(?!\d)", re.IGNORECASE)
_BARE_VERSION = re.compile(r"^\s*v?2\.([12])\s*$")


@dataclasses.dataclass(frozen=True)
class WanDetection:
    """What the weights (and metadata) say about a WAN diffusion model."""

    dim: int
    num_layers: int
    in_dim: int
    out_dim: int
    variant: str  # t2v, i2v, vace, camera, s2v, humo, animate (or scail/scail2/wandancer)
    variant_evidence: str
    # "2.2" when the architecture exists only in WAN 2.2; None when it is the 2.1 architecture (WAN 2.1,
    # or a WAN 2.2 A14B high/low-noise file).
    weights_version: str | None
    version_evidence: str
    metadata_version: str | None = None
    metadata_field: str | None = None

    @property
    def size_name(self) -> str | None:
        """1.3B, 5B or 14B for the released shapes; None for other sizes."""
        return SIZE_NAMES.get(self.dim)

    @property
    def version(self) -> str:
        """The best guess: weights first, then metadata, else 2.1."""
        return self.weights_version or self.metadata_version or "2.1"

    @property
    def is_ti2v(self) -> bool:
        return self.out_dim == WAN22_LATENT_CHANNELS

    def describe(self) -> str:
        kind = "TI2V" if self.is_ti2v else self.variant
        size = f" {self.size_name}" if self.size_name else ""
        return (
            f"WAN {self.version}{size} {kind} ({self.num_layers} blocks, dim {self.dim}, "
            f"{self.in_dim} in / {self.out_dim} out channels)"
        )


def logical_shapes(state_dict: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """Name -> logical shape; GGUF tensors report theirs in ``tensor_shape`` (their ``shape`` is bytes)."""
    out = {}
    for name, tensor in state_dict.items():
        shape = getattr(tensor, "tensor_shape", None)
        if shape is None:
            shape = tensor.shape
        out[name] = tuple(int(s) for s in shape)
    return out


def _prefix(keys: Iterable[str]) -> str | None:
    """The key prefix in front of ``head.modulation`` ('' for a bare diffusion model)."""
    found = [k[: -len("head.modulation")] for k in keys if k.endswith("head.modulation")]
    if not found:
        return None
    return min(found, key=len)  # the outermost (a VACE or nested module never has its own head)


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    indices = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return len(indices)


def _shape(shapes: Mapping[str, Sequence[int]], key: str, what: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise ValueError(f"not a complete WAN diffusion model: {what} ({key}) is missing")
    return tuple(shape)


def metadata_version(metadata: Mapping[str, object] | None) -> tuple[str | None, str | None]:
    """(version, field) named by file metadata (GGUF general.* / safetensors __metadata__), or (None, None)."""
    if not isinstance(metadata, Mapping) or not metadata:
        return None, None  # damaged files can carry any JSON value here
    for field in _NAME_FIELDS:
        value = metadata.get(field)
        if not isinstance(value, str):
            continue
        match = _VERSION_IN_NAME.search(value)
        if match is None and field == "wan.version":
            match = _BARE_VERSION.match(value)
        if match is not None:
            return f"2.{match.group(1)}", field
    # general.version = "2.2" next to a name that says WAN.
    version = metadata.get("general.version")
    name = " ".join(str(metadata.get(f, "")) for f in ("general.name", "general.basename"))
    if isinstance(version, str) and "wan" in name.lower():
        match = _BARE_VERSION.match(version)
        if match is not None:
            return f"2.{match.group(1)}", "general.version"
    return None, None


def detect_wan(
    shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, object] | None = None
) -> WanDetection:
    """Detect a WAN 2.1/2.2 diffusion model from ``{name: logical shape}`` (any key prefix).

    Raises ValueError when the keys are not a WAN diffusion model's.
    """
    prefix = _prefix(shapes)
    if prefix is None:
        raise ValueError(
            "not a WAN 2.1/2.2 diffusion model: it has no head.modulation weight "
            f"({len(shapes)} tensors, e.g. {', '.join(sorted(shapes)[:3]) or 'none'})"
        )
    if prefix:
        shapes = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    keys = shapes.keys()

    dim = _shape(shapes, "head.modulation", "the head modulation")[-1]
    out_dim = _shape(shapes, "head.head.weight", "the output head")[0] // 4
    patch = _shape(shapes, "patch_embedding.weight", "the patch embedding")
    in_dim = patch[1] if len(patch) > 1 else 0
    num_layers = _count_blocks(keys, "blocks.")
    if num_layers == 0:
        raise ValueError("not a complete WAN diffusion model: it has no transformer blocks (blocks.N.*)")

    has_img_emb = IMG_EMB_KEY in keys
    variant, evidence, trigger = "", "", ""
    for key, name, what in VARIANT_TRIGGERS + OTHER_TRIGGERS:
        if key in keys:
            variant, evidence, trigger = name, f"has the {what} ({key})", what
            break
    if not variant:
        if has_img_emb:
            variant, evidence = "i2v", f"has the CLIP image embedding ({IMG_EMB_KEY})"
        elif in_dim == I2V_IN_DIM:
            variant, evidence = "i2v", f"takes {in_dim} input channels (image-conditioned, no CLIP embedding)"
        else:
            variant = "t2v"
            evidence = "has none of the VACE/camera/audio/face/image-embedding weights"

    weights_version, version_evidence = None, "the WAN 2.1 architecture (also used by WAN 2.2 A14B)"
    if out_dim == WAN22_LATENT_CHANNELS:
        weights_version = "2.2"
        version_evidence = f"a {out_dim}-channel output (the WAN 2.2 TI2V 5B latent)"
    elif variant in ("s2v", "animate"):
        weights_version = "2.2"
        release = {"s2v": "S2V", "animate": "Animate"}[variant]
        version_evidence = f"the {trigger}, which only WAN 2.2 {release} has"
    elif variant == "camera" and not has_img_emb:
        weights_version = "2.2"
        version_evidence = "a camera adapter without CLIP image embedding (WAN 2.2 Fun Camera)"

    meta_version, meta_field = metadata_version(metadata)
    return WanDetection(
        dim=int(dim),
        num_layers=num_layers,
        in_dim=int(in_dim),
        out_dim=int(out_dim),
        variant=variant,
        variant_evidence=evidence,
        weights_version=weights_version,
        version_evidence=version_evidence,
        metadata_version=meta_version,
        metadata_field=meta_field,
    )


@dataclasses.dataclass(frozen=True)
class ResolvedWanType:
    """The version and variant a load goes ahead with, and notes worth a log line."""

    version: str
    variant: str
    notes: tuple[str, ...] = ()


def resolve_choice(
    detection: WanDetection, wan_version: str = "auto", model_variant: str = "auto", source: str = "the file"
) -> ResolvedWanType:
    """Check the node's explicit choices against the weights.

    "auto" takes what the weights say. A choice the weights allow changes nothing; one they rule out raises
    ValueError naming the choice and what the weights say.
    """
    check_choice("wan_version", wan_version, WAN_VERSIONS)
    check_choice("model_variant", model_variant, MODEL_VARIANTS)
    notes: list[str] = []
    d = detection

    if wan_version == "auto":
        version = d.version
        if d.weights_version is None and d.metadata_version is not None:
            notes.append(f"WAN {version} from the file's metadata ({d.metadata_field})")
    elif d.weights_version is not None and wan_version != d.weights_version:
        raise ValueError(
            f"wan_version={wan_version} does not match {source}: its weights are WAN {d.weights_version} "
            f"({d.version_evidence})"
        )
    else:
        version = wan_version
        if d.metadata_version is not None and d.metadata_version != version and d.weights_version is None:
            notes.append(
                f"wan_version={version} while the file's metadata ({d.metadata_field}) says "
                f"{d.metadata_version}; both load the same way"
            )
    if d.metadata_version is not None and d.weights_version is not None and d.metadata_version != d.version:
        notes.append(
            f"the file's metadata ({d.metadata_field}) says WAN {d.metadata_version}, its weights are WAN "
            f"{d.weights_version} ({d.version_evidence}): going by the weights"
        )
    if version == "2.2" and d.weights_version is None:
        notes.append(
            "WAN 2.2 with the WAN 2.1 architecture: WAN 2.2 A14B high-noise and low-noise files have the "
            "WAN 2.1 14B architecture and load as such (load each as its own model)"
        )

    allowed = {d.variant}
    if d.is_ti2v:
        allowed.add("i2v")  # TI2V: one model for text- and image-to-video
    if model_variant == "auto":
        variant = d.variant
    elif model_variant not in allowed:
        raise ValueError(
            f"model_variant={model_variant} does not match {source}: its weights are a WAN {d.variant} model "
            f"({d.variant_evidence})"
        )
    else:
        variant = model_variant
    return ResolvedWanType(version=version, variant=variant, notes=tuple(notes))
