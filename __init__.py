"""ComfyUI-Wan22Blockswap: block swapping for WAN 2.1/2.2 video models in ComfyUI.

ComfyUI imports this package from custom_nodes/. The node classes are imported only when ComfyUI is
importable, so the engine and its tests run without ComfyUI.
"""

import importlib.util

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
# Served by ComfyUI at /extensions/<this folder>/: web/docs/<node id>.md is the node's help page, which
# the frontend shows in the node's Help / Info panel.
WEB_DIRECTORY = "./web"

# __package__ is empty when a tool imports this file on its own (pytest does, for the repository
# folder); the nodes' relative imports need the package.
if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
