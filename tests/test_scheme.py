"""QuantScheme: the one torch-free home of bits and group size."""

import subprocess
import sys

import pytest

from eqat_cli.errors import BadInputError, UnsupportedError
from eqat_cli.scheme import SUPPORTED_BITS, QuantScheme


def test_scheme_validates_and_derives():
    s = QuantScheme(2, 64)
    assert (s.qmax, s.pack_factor, s.tag) == (3, 16, "w2g64")
    assert s.n_groups(576) == 9 and QuantScheme(4, 128).n_groups(576) == 5  # ragged last group
    assert QuantScheme(3, -1).n_groups(576) == 1 and QuantScheme(3, -1).effective_group(576) == 576
    assert QuantScheme(3, 64).pack_factor == 10 and QuantScheme(3, 64).packed_rows(576) == 58
    assert QuantScheme.parse("w4g128") == QuantScheme(4, 128)
    assert QuantScheme.parse("W3") == QuantScheme(3, 64)
    assert QuantScheme.parse("w4g-1").per_channel
    assert QuantScheme(4, 64).bits_per_weight(4096) == pytest.approx(4 + (16 + 4) / 64)


@pytest.mark.parametrize("bits,group,err", [(5, 64, UnsupportedError), (1, 64, UnsupportedError),
                                            (2, 1, BadInputError), (2, 0, BadInputError),
                                            (2, -2, BadInputError), (True, 64, UnsupportedError)])
def test_scheme_refuses(bits, group, err):
    with pytest.raises(err):
        QuantScheme(bits, group)


@pytest.mark.parametrize("text", ["", "g64", "w", "wxg64", "w2g", "w2g64x"])
def test_parse_refuses(text):
    with pytest.raises(BadInputError):
        QuantScheme.parse(text)


def test_one_supported_bits():
    """Every room that names the supported widths reads the one tuple."""
    from eqat_cli.benchmark import SUPPORTED_BITS as bench_bits
    from eqat_cli.formats import detect
    from eqat_cli.quant import caps, primitives

    assert primitives.SUPPORTED_BITS is SUPPORTED_BITS
    assert detect.SUPPORTED_BITS is SUPPORTED_BITS
    assert bench_bits is SUPPORTED_BITS
    assert caps.TORCH_KERNEL_CAPS.bits == tuple(SUPPORTED_BITS)


def test_scheme_imports_no_torch():
    code = "import sys, eqat_cli.scheme; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
