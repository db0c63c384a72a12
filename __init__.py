"""ComfyUI-Wan22Blockswap: block swapping for WAN 2.1/2.2 video models in ComfyUI.

ComfyUI imports this package from custom_nodes/. The node classes are imported only when ComfyUI is
importable, so the engine and its tests run without ComfyUI.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
