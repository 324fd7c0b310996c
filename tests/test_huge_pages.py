"""Huge pages for the packed weights a decode step streams (rl/kernels/cpu/malloc.py): speed
only, so what is tested is that the advice keeps every value and covers the right range."""
import torch

from rl.kernels.cpu import malloc


def test_huge_pages_keep_the_values_and_cover_whole_pages_inside():
    t = torch.randn(3 << 20)                           # 12 MiB, already touched: the advice is for later faults
    before = t.clone()
    advised = malloc.huge_pages(t)
    assert torch.equal(t, before)
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    inside = (end // malloc.HUGE_PAGE_BYTES - -(-start // malloc.HUGE_PAGE_BYTES)) * malloc.HUGE_PAGE_BYTES
    assert advised in (0, inside)                      # 0: a kernel without THP; else all of them
    strided = torch.randn(64, 2, 1 << 16)[:, 1]        # a pool view: spans its parent's rows
    copy = strided.clone()
    malloc.huge_pages(strided)
    assert torch.equal(strided, copy)
    assert malloc.huge_pages(torch.randn(100)) == 0    # smaller than a huge page: nothing to ask



def test_a_pack_on_huge_pages_is_the_same_pack():
    from rl.kernels.cpu import tiles
    if not tiles.available():
        return                                         # no tile packs on this CPU: nothing to compare
    w = torch.randn(4096, 1024).bfloat16()             # 8 MiB packed: whole huge pages inside
    assert torch.equal(tiles.pack(w, huge=True).data, tiles.pack(w).data)
