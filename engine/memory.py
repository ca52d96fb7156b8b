"""Peak memory the engine allocates during a call (CONTRACT §2 `meta.memory.peak_bytes`).

On CUDA the device allocator keeps the peak. On the CPU torch keeps none, so a dispatch mode
counts every storage an op creates (views and in-place results share their input's storage and
are not counted) until the last tensor on it is freed: the peak of live bytes allocated since
the tracker started, i.e. the call's extra memory beyond its inputs. Memory a C++ kernel takes
for itself is not seen: the CPU flash kernel's per-thread workspace (~0.56 MiB a thread at D = 64).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr == 0:
                continue
            entry = self.live.setdefault(ptr, [storage.nbytes(), 0])
            if entry[1] == 0:
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._counter: _StorageCounter | None = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._counter = _StorageCounter()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            assert self._counter is not None
            self._counter.__exit__(*exc)
            self.peak_bytes = self._counter.peak
