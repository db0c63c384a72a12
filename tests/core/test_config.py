"""Node settings validation: errors name the input and its valid range."""

import logging

import pytest

from wan22_blockswap.config import MAX_BLOCKS, SwapConfig


def test_defaults_are_the_seed_readme_defaults():
    c = SwapConfig()
    assert (c.blocks_to_swap, c.offload_txt_emb, c.offload_img_emb, c.use_non_blocking) == (
        20,
        False,
        False,
        False,
    )
    assert (c.vace_blocks_to_swap, c.prefetch_blocks, c.block_swap_debug) == (0, 0, False)
    assert not c.overlaps_copies
    assert SwapConfig(prefetch_blocks=1, use_non_blocking=True).overlaps_copies


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"blocks_to_swap": -1}, r"blocks_to_swap must be between 0 and 64 \(got -1\)"),
        ({"blocks_to_swap": MAX_BLOCKS + 1}, r"blocks_to_swap must be between 0 and 64 \(got 65\)"),
        ({"blocks_to_swap": 2.5}, r"blocks_to_swap must be an integer between 0 and 64 \(got 2.5\)"),
        ({"prefetch_blocks": 9}, r"prefetch_blocks must be between 0 and 8 \(got 9\)"),
        ({"vace_blocks_to_swap": -3}, r"vace_blocks_to_swap must be between 0 and 32 \(got -3\)"),
        ({"use_non_blocking": "yes"}, r"use_non_blocking must be true or false \(got 'yes'\)"),
        ({"blocks_to_swap": True}, r"blocks_to_swap must be an integer"),
    ],
)
def test_bad_settings_name_the_input_and_range(settings, message):
    with pytest.raises(ValueError, match=message):
        SwapConfig(**settings)


def test_fitting_to_a_model_clamps_with_one_warning_each(caplog):
    with caplog.at_level(logging.WARNING):
        fitted = SwapConfig(blocks_to_swap=50, vace_blocks_to_swap=20).fitted_to(40, 8)
    assert (fitted.blocks_to_swap, fitted.vace_blocks_to_swap) == (40, 8)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "blocks_to_swap=50 but the model has 40 blocks" in messages[0]
    assert SwapConfig(blocks_to_swap=10).fitted_to(40, 0) == SwapConfig(blocks_to_swap=10)
    with caplog.at_level(logging.WARNING):
        assert SwapConfig(vace_blocks_to_swap=2).fitted_to(40, 0).vace_blocks_to_swap == 0
    assert "has no VACE blocks" in caplog.records[-1].getMessage()
