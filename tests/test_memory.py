"""Process memory helpers used by Block-AP and the benchmarks."""

import torch

from eqat_cli.memory import peak_rss_bytes, release_memory, rss_bytes


def test_peak_rss_is_in_bytes_and_tracks_a_large_allocation():
    before = peak_rss_bytes()
    assert before >= rss_bytes() * 0.9 > 0
    x = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
    assert float(x[-1]) == 1.0
    assert rss_bytes() > 200 * 2**20
    assert peak_rss_bytes() > 250 * 2**20  # the kernel updates ru_maxrss lazily, so no exact >= rss
    del x
    release_memory()
    # freed tensor memory goes back to the OS; the high-water mark does not come down
    assert rss_bytes() < peak_rss_bytes() - 200 * 2**20
