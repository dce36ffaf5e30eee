"""Bit packing: exact round trips for every width, and the documented bit positions."""

import pytest
import torch

from eqat_cli.quant import packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,m", [(64, 8), (576, 192), (37, 5), (1, 3), (10, 7)])
def test_rows_round_trip(bits, n, m):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n, m), generator=g, dtype=torch.int32)
    packed = packing.pack_rows(codes, bits)
    pf = 32 // bits
    assert packed.dtype == torch.int32
    assert packed.shape == (-(-n // pf), m)
    assert torch.equal(packing.unpack_rows(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cols_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 43), dtype=torch.int32)
    packed = packing.pack_cols(codes, bits)
    assert packed.shape == (5, -(-43 // (32 // bits)))
    assert torch.equal(packing.unpack_cols(packed, bits, 43), codes)


def test_bit_positions_least_significant_first():
    # 4-bit: codes 1..8 in one word -> 0x87654321 (sign bit set: stored as negative int32).
    codes = torch.arange(1, 9, dtype=torch.int32).view(8, 1)
    word = packing.pack_rows(codes, 4)
    assert word.item() == 0x87654321 - 2**32
    # 2-bit: code j at bits 2j.
    codes2 = torch.tensor([[3]] + [[0]] * 14 + [[1]], dtype=torch.int32)
    assert packing.pack_rows(codes2, 2).item() == 3 + (1 << 30)
    # 3-bit: 10 codes per word, top 2 bits unused.
    codes3 = torch.full((10, 1), 7, dtype=torch.int32)
    assert packing.pack_rows(codes3, 3).item() == 2**30 - 1


def test_all_ones_max_codes():
    for bits in (2, 4, 8):
        codes = torch.full((32 // bits, 1), 2**bits - 1, dtype=torch.int32)
        assert packing.pack_rows(codes, bits).item() == -1  # all 32 bits set


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_rows(torch.tensor([[4]], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_rows(torch.tensor([[-1]], dtype=torch.int32), 4)


@pytest.mark.parametrize("n", [32, 96, 576])
def test_gptq3_round_trip_and_layout(n):
    codes = torch.randint(0, 8, (n, 6), dtype=torch.int32)
    packed = packing.pack_rows_gptq3(codes)
    assert packed.shape == (3 * n // 32, 6)
    assert torch.equal(packing.unpack_rows_gptq3(packed, n), codes)
    # Reference: one 96-bit little-endian integer per 32 codes, code k at bits [3k, 3k+3).
    for col in range(2):
        big = sum(int(codes[k, col]) << (3 * k) for k in range(32))
        words = [(big >> (32 * w)) & 0xFFFFFFFF for w in range(3)]
        got = [int(x) & 0xFFFFFFFF for x in packed[:3, col]]
        assert got == words


def test_gptq3_cols_and_bad_length():
    codes = torch.randint(0, 8, (4, 64), dtype=torch.int32)
    assert torch.equal(packing.unpack_cols_gptq3(packing.pack_cols_gptq3(codes), 64), codes)
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack_rows_gptq3(torch.zeros(40, 1, dtype=torch.int32))
