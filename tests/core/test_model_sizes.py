"""The sizes quoted in README and tooltips, computed from WAN's block shapes."""

import pytest
import torch

from wan22_blockswap.bench import synthetic_model as sm


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def meta_model(preset, variant="t2v"):
    with torch.device("meta"):
        return sm.SyntheticWanModel(sm.PRESETS[preset], variant)


@pytest.mark.parametrize(
    "preset, variant, millions, blocks",
    [
        ("1.3b", "t2v", 46.4, 30),
        ("5b", "t2v", 163.7, 30),
        ("14b", "t2v", 351.4, 40),
        ("14b", "i2v", 403.8, 40),
    ],
)
def test_block_sizes_match_wan(preset, variant, millions, blocks):
    model = meta_model(preset, variant)
    assert len(model.blocks) == blocks
    assert param_count(model.blocks[0]) / 1e6 == pytest.approx(millions, abs=0.1)


def test_embedding_sizes_quoted_in_tooltips():
    model = meta_model("14b", "i2v")
    assert 2 * param_count(model.text_embedding) / 1e6 == pytest.approx(94, abs=1)  # MB in bf16
    assert 2 * param_count(model.img_emb) / 1e6 == pytest.approx(16, abs=1)
    assert 2 * param_count(meta_model("1.3b").text_embedding) / 1e6 == pytest.approx(17, abs=1)
