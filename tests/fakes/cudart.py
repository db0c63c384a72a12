"""CUDA's runtime pinning calls (cudaHostRegister / cudaHostUnregister) on a machine without CUDA: every pin
is recorded with its flags, nothing is locked. Tests install it as `host_memory._cuda_runtime`."""

from __future__ import annotations


class FakeCudart:
    """What CUDA's runtime would answer. register_error / unregister_error: the error code each call returns
    (0: success). Unpinning memory that was never pinned is a test failure (KeyError), unless that unpin is
    made to fail anyway."""

    def __init__(self, register_error: int = 0, unregister_error: int = 0):
        self.register_error, self.unregister_error = register_error, unregister_error
        self.registered: dict[int, int] = {}
        self.flags: list[int] = []

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
        self.flags.append(flags)
        if not self.register_error:
            self.registered[ptr] = size
        return self.register_error

    def cudaHostUnregister(self, ptr):  # noqa: N802
        if self.unregister_error:
            self.registered.pop(ptr, None)
        else:
            self.registered.pop(ptr)
        return self.unregister_error
