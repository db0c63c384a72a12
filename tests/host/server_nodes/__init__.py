"""Test-only ComfyUI custom node package, installed into the temporary ComfyUI that host_server.py starts.

WAN's text encoder (UMT5-XXL) has no test-size version, so this node stands in for CLIPTextEncode: it
outputs random CONDITIONING with WAN's text width (4096) from a seed. Never shipped with the pack.
"""

import torch

TEXT_DIM = 4096


class Wan22TestRandomConditioning:
    CATEGORY = "ComfyUI_Wan22Blockswap/testing"
    DESCRIPTION = "Test only: random WAN text conditioning of shape (1, tokens, 4096) from a seed."
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            }
        }

    def make(self, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, TEXT_DIM, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"Wan22TestRandomConditioning": Wan22TestRandomConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"Wan22TestRandomConditioning": "WAN 2.2 test: random conditioning"}
