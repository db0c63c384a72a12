"""WAN version/variant detection from state-dict shapes, and the node's explicit choices against it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wan22_blockswap.bench import synthetic_model
from wan22_blockswap.wan.detect import (
    MODEL_VARIANTS,
    detect_wan,
    logical_shapes,
    metadata_version,
    resolve_choice,
)

# Keys ComfyUI's model detection looks for, with the shapes the real models give them (dim 128 here).
TRIGGERS = {
    "camera": {"control_adapter.conv.weight": (128, 1536, 2, 2)},
    "s2v": {"casual_audio_encoder.encoder.final_linear.weight": (128, 128)},
    "humo": {"audio_proj.audio_proj_glob_1.layer.bias": (128,)},
    "animate": {"face_adapter.fuser_blocks.0.k_norm.weight": (128,)},
}


def shapes_of(
    base: str = "t2v", preset: str = "tiny", extra: dict | None = None, drop: tuple = (), **shape_changes
) -> dict[str, tuple[int, ...]]:
    """Logical shapes of a synthetic WAN model (ComfyUI key names) built on the meta device: no memory."""
    shape = dataclasses.replace(synthetic_model.PRESETS[preset], **shape_changes)
    with torch.device("meta"):
        model = synthetic_model.SyntheticWanModel(shape, base)
    shapes = logical_shapes(model.state_dict())
    for key in drop:
        shapes = {k: v for k, v in shapes.items() if not k.startswith(key)}
    shapes.update(extra or {})
    return shapes


# variant name -> (shapes, expected variant, expected weights_version)
CASES = {
    "t2v": (lambda: shapes_of("t2v"), "t2v", None),
    "i2v (CLIP image embedding)": (lambda: shapes_of("i2v", in_dim=36), "i2v", None),
    "i2v 2.2 A14B (36 channels, no CLIP)": (lambda: shapes_of("t2v", in_dim=36), "i2v", None),
    "vace": (lambda: shapes_of("vace"), "vace", None),
    "camera 2.1": (lambda: shapes_of("i2v", in_dim=32, extra=TRIGGERS["camera"]), "camera", None),
    "camera 2.2": (lambda: shapes_of("t2v", in_dim=36, extra=TRIGGERS["camera"]), "camera", "2.2"),
    "s2v": (lambda: shapes_of("t2v", extra=TRIGGERS["s2v"]), "s2v", "2.2"),
    "humo": (lambda: shapes_of("t2v", extra=TRIGGERS["humo"]), "humo", None),
    "animate": (lambda: shapes_of("i2v", in_dim=36, extra=TRIGGERS["animate"]), "animate", "2.2"),
    "ti2v 5b": (lambda: shapes_of("t2v", in_dim=48, out_dim=48), "t2v", "2.2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_variant_is_detected_from_its_keys(case):
    make, variant, weights_version = CASES[case]
    d = detect_wan(make())
    assert d.variant == variant
    assert d.weights_version == weights_version
    assert d.version == (weights_version or "2.1")
    assert (d.dim, d.num_layers) == (128, 4)
    assert d.variant_evidence  # says why


def test_sizes_and_channels_of_the_released_shapes():
    small = detect_wan(shapes_of(preset="1.3b"))
    assert (small.size_name, small.dim, small.num_layers, small.in_dim, small.out_dim) == (
        "1.3B",
        1536,
        30,
        16,
        16,
    )
    five = detect_wan(shapes_of(preset="5b"))
    assert (five.size_name, five.num_layers, five.in_dim, five.out_dim) == ("5B", 30, 48, 48)
    assert five.is_ti2v and five.version == "2.2" and "48-channel" in five.version_evidence
    assert five.describe() == "WAN 2.2 5B TI2V (30 blocks, dim 3072, 48 in / 48 out channels)"
    big = detect_wan(shapes_of(preset="14b", in_dim=36))
    assert (big.size_name, big.num_layers, big.variant, big.version) == ("14B", 40, "i2v", "2.1")
    assert detect_wan(shapes_of()).size_name is None  # test sizes have no release name


def test_trigger_order_follows_comfyui():
    # VACE wins over everything; a face adapter wins over the image embedding of an Animate model.
    both = shapes_of("vace", extra={**TRIGGERS["camera"], **TRIGGERS["s2v"]})
    assert detect_wan(both).variant == "vace"
    assert detect_wan(shapes_of("i2v", extra=TRIGGERS["animate"])).variant == "animate"
    assert detect_wan(shapes_of("t2v", extra={**TRIGGERS["s2v"], **TRIGGERS["humo"]})).variant == "s2v"


def test_checkpoint_prefixes_are_stripped():
    plain = shapes_of("i2v", in_dim=36)
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        prefixed = {prefix + k: v for k, v in plain.items()}
        prefixed["first_stage_model.decoder.weight"] = (3, 3)  # other parts of a full checkpoint
        d = detect_wan(prefixed)
        assert (d.variant, d.in_dim, d.num_layers) == ("i2v", 36, 4)


def test_gguf_tensors_are_read_by_their_logical_shape():
    class Quantized:  # what GGUFWeight / ComfyUI-GGUF's GGMLTensor expose
        def __init__(self, logical, raw):
            self.tensor_shape = torch.Size(logical)
            self.shape = torch.Size(raw)

    sd = {k: torch.empty(v, device="meta") for k, v in shapes_of("t2v", in_dim=48, out_dim=48).items()}
    # Q8_0: 34 bytes per 32 values. Rows survive, the last dim becomes bytes.
    sd["head.head.weight"] = Quantized((192, 128), (192, 136))
    sd["patch_embedding.weight"] = Quantized((128, 48, 1, 2, 2), (128 * 48, 34 // 32 * 4))
    shapes = logical_shapes(sd)
    assert shapes["patch_embedding.weight"] == (128, 48, 1, 2, 2)
    d = detect_wan(shapes)
    assert (d.in_dim, d.out_dim, d.version) == (48, 48, "2.2")


def test_files_that_are_not_wan_models_are_refused():
    with pytest.raises(ValueError, match="not a WAN 2.1/2.2 diffusion model: it has no head.modulation"):
        detect_wan({"input_blocks.0.0.weight": (320, 4, 3, 3), "out.2.weight": (4, 320, 3, 3)})
    incomplete = shapes_of(drop=("head.head.",))
    with pytest.raises(ValueError, match=r"the output head \(head.head.weight\) is missing"):
        detect_wan(incomplete)
    no_blocks = shapes_of(drop=("blocks.",))
    with pytest.raises(ValueError, match="no transformer blocks"):
        detect_wan(no_blocks)


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"general.name": "Wan2.2-T2V-A14B-HighNoise"}, ("2.2", "general.name")),
        ({"general.basename": "wan2.1_t2v_1.3B_fp16"}, ("2.1", "general.basename")),
        ({"modelspec.title": "WAN 2.2 I2V A14B low noise"}, ("2.2", "modelspec.title")),
        ({"modelspec.architecture": "wan_2_1-t2v"}, ("2.1", "modelspec.architecture")),
        ({"general.name": "Wan", "general.version": "2.2"}, ("2.2", "general.version")),
        ({"wan.version": "2.1"}, ("2.1", "wan.version")),
        ({"general.name": "Wan2.21-something"}, (None, None)),  # not a version of ours
        ({"general.name": "Flux", "general.version": "2.2"}, (None, None)),  # a version, but not WAN's
        ({"general.architecture": "wan", "general.file_type": 7}, (None, None)),
        ({}, (None, None)),
        (None, (None, None)),
    ],
)
def test_version_from_metadata(metadata, expected):
    assert metadata_version(metadata) == expected


def test_metadata_version_is_used_only_where_the_weights_cannot_tell():
    a14b = detect_wan(shapes_of(), {"general.name": "Wan2.2-T2V-A14B-LowNoise"})
    assert (a14b.weights_version, a14b.metadata_version, a14b.version) == (None, "2.2", "2.2")
    choice = resolve_choice(a14b)
    assert choice.version == "2.2"
    assert any("metadata (general.name)" in n for n in choice.notes)
    assert any("2.1 14B architecture" in n for n in choice.notes)
    # A 48-channel file is WAN 2.2 whatever its metadata claims.
    mislabelled = detect_wan(shapes_of(in_dim=48, out_dim=48), {"general.name": "wan2.1 t2v"})
    choice = resolve_choice(mislabelled)
    assert choice.version == "2.2"
    assert any("going by the weights" in n for n in choice.notes)


def test_auto_takes_what_the_weights_say():
    for case, (make, variant, weights_version) in CASES.items():
        choice = resolve_choice(detect_wan(make()))
        assert (choice.version, choice.variant) == (weights_version or "2.1", variant), case


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_choices_that_match_change_nothing(case):
    make, variant, weights_version = CASES[case]
    d = detect_wan(make())
    auto = resolve_choice(d)
    explicit = resolve_choice(d, weights_version or "2.1", variant)
    assert (explicit.version, explicit.variant) == (auto.version, auto.variant)


@pytest.mark.parametrize("case", list(CASES))
def test_every_variant_the_weights_rule_out_raises(case):
    make, variant, _ = CASES[case]
    d = detect_wan(make())
    allowed = {variant, "i2v"} if case == "ti2v 5b" else {variant}
    for choice in MODEL_VARIANTS[1:]:
        if choice in allowed:
            assert resolve_choice(d, "auto", choice).variant == choice
            continue
        with pytest.raises(ValueError) as err:
            resolve_choice(d, "auto", choice, source="wan.safetensors")
        message = str(err.value)
        assert f"model_variant={choice} does not match wan.safetensors" in message
        assert f"WAN {variant} model" in message


def test_wan_version_the_weights_rule_out_raises():
    ti2v = detect_wan(shapes_of(in_dim=48, out_dim=48))
    with pytest.raises(
        ValueError, match=r"wan_version=2.1 does not match x.gguf: its weights are WAN 2.2 \(a 48"
    ):
        resolve_choice(ti2v, "2.1", source="x.gguf")
    s2v = detect_wan(shapes_of(extra=TRIGGERS["s2v"]))
    with pytest.raises(ValueError, match=r"wan_version=2.1 .* WAN 2.2 \(the speech-to-video audio encoder"):
        resolve_choice(s2v, "2.1")
    # The 2.1 architecture is also WAN 2.2 A14B's: both choices load it, 2.2 with a note.
    t2v = detect_wan(shapes_of())
    assert resolve_choice(t2v, "2.1").notes == ()
    as_22 = resolve_choice(t2v, "2.2", "t2v")
    assert as_22.version == "2.2" and any("A14B" in n for n in as_22.notes)


def test_invalid_choice_strings_are_refused():
    d = detect_wan(shapes_of())
    with pytest.raises(ValueError, match=r"wan_version must be one of auto, 2.1, 2.2 \(got '2.3'\)"):
        resolve_choice(d, "2.3")
    with pytest.raises(ValueError, match=r"model_variant must be one of auto, t2v, .* \(got 'T2V'\)"):
        resolve_choice(d, "auto", "T2V")


@pytest.mark.parametrize("metadata", [["wan2.2", "x"], "wan2.2", 7, {"general.name": ["wan2.2"]}])
def test_malformed_metadata_is_ignored_not_an_attribute_error(metadata):
    detection = detect_wan(shapes_of(), metadata)
    assert detection.metadata_version is None and detection.version == "2.1"
