"""The KV pool's CPU pages: zeroed, and in memory advised for transparent huge pages."""

from __future__ import annotations

import torch

from adrenaline.engine.kv_pool import HUGE_PAGE, KVPool
from adrenaline.kernels.torch_backend import TorchAttention


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_cpu_pages_are_zeroed_and_advised_for_huge_pages():
    pool = KVPool(3, 100, 64, TorchAttention(9, 3, 64), torch.bfloat16, "cpu")
    for pages in pool.k + pool.v:
        assert pages.shape == (3, 100, 64, 64) and pages.dtype == torch.bfloat16
        assert pages.is_contiguous() and not pages.any()
        assert pages.data_ptr() % HUGE_PAGE == 0
        assert "hg" in _vm_flags(pages.data_ptr())  # MADV_HUGEPAGE
    # Writable and independent of one another.
    pool.k[0][1, 2, 3] = 1.0  # one token row: 64 values
    assert pool.k[0].sum() == 64 and not pool.k[1].any() and not pool.v[0].any()
    assert pool.num_bytes == 6 * 3 * 100 * 64 * 64 * 2
