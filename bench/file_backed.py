"""A model whose blocks are views of a memory-mapped file, as a GGUF loader leaves its weights: for the
benchmark's file-tier rows (test_performance.py --host-tiers). No ComfyUI.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..host_memory import file_mappings
from ..tensor_layout import _set_tensor

ALIGNMENT = 64


class FileBackedBlocks:
    """The parameters of `model.blocks`, written once into `path`; `bind()` points them at the file's map."""

    def __init__(self, model: nn.Module, path: Path):
        self.path = Path(path)
        self.entries: list[tuple[nn.Module, str, int, torch.dtype, torch.Size]] = []
        offset = 0
        with open(self.path, "wb") as f:
            for block in model.blocks:
                for module in block.modules():
                    for attr, p in module._parameters.items():
                        if p is None:
                            continue
                        raw = p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                        f.write(raw + b"\0" * (-len(raw) % ALIGNMENT))
                        self.entries.append((module, attr, offset, p.dtype, p.shape))
                        offset += len(raw) + (-len(raw) % ALIGNMENT)
        self.nbytes = offset
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")  # MAP_SHARED, read-only

    def bind(self) -> None:
        """Every block parameter becomes a view of the file (values unchanged: the file holds them)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for module, attr, offset, dtype, shape in self.entries:
                n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                view = torch.from_numpy(self._map[offset : offset + n]).view(dtype).view(shape)
                _set_tensor(module, attr, True, view)

    def drop_page_cache(self) -> None:
        """Evict the file from RAM: unmap its pages from this process (clean file pages, read again on the
        next touch) and drop them from the page cache, so the next read comes from the disk."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        real = os.path.realpath(self.path)
        for m in file_mappings():
            if os.path.realpath(m.path) == real:
                libc.madvise(m.start, m.end - m.start, 4)  # MADV_DONTNEED
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
