"""The int8-activation decode kernel (``quant/cpu_q8.py``) and the compact decode step
(``decode.py``): the C kernel equals the same arithmetic in float64 torch at 2/3/4/8 bits, ragged
and per-channel groups, fused layers with biases, both the vectorised and the portable loop; it
stays within the activation rounding of the fp32 reference; the compact step with a static KV
cache on fp32 kernels gives transformers' greedy tokens (dynamic cache), and its int8 mode stays
close to them."""

from __future__ import annotations

import pytest
import torch

from eqat_cli.scheme import QuantScheme

from conftest import build, random_packed_layer, tiny_llama3_config, tiny_llama_config
from eqat_cli.quant import cpu_kernel, cpu_q8

pytestmark = pytest.mark.skipif(not cpu_kernel.library_status()[0], reason="C++ kernel unavailable")

SHAPES = [(128, 64, 64), (100, 70, 32), (96, 130, 48), (200, 65, -1), (576, 192, 64)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("portable", [False, True])
def test_q8_kernel_equals_its_torch_arithmetic(bits, portable):
    for k, n, g in SHAPES:
        layer = random_packed_layer(k, n, bits, g, seed=bits + k)
        x = torch.randn(k, generator=torch.Generator().manual_seed(k))
        y = cpu_q8.Q8Weights([layer]).matvec(x, portable=portable)[0]
        ref = cpu_q8.reference_matvec(layer, x)
        assert y.shape == (n,)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        exact = torch.nn.functional.linear(x, layer.dequantize())
        assert (y - exact).norm() <= 2e-2 * exact.norm()  # activation rounding only


@pytest.mark.parametrize("bits", [3, 4])
def test_q8_fused_group_with_bias_and_fp32_scales(bits):
    layers = [random_packed_layer(96, n, bits, 32, bias=True, seed=n, scales_dtype=sd)
              for n, sd in ((40, torch.float32), (24, torch.float32), (70, torch.float32))]
    x = torch.randn(96)
    outs = cpu_q8.Q8Weights(layers).matvec(x, threads=2)
    for layer, y in zip(layers, outs):
        ref = cpu_q8.reference_matvec(layer, x) + layer.bias.double()
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_q8_zero_activation_group():
    layer = random_packed_layer(128, 64, 4, 64)
    x = torch.randn(128)
    x[:64] = 0
    y = cpu_q8.Q8Weights([layer]).matvec(x)[0]
    ref = cpu_q8.reference_matvec(layer, x)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def _rtn(config, bits=4, group=32):
    from eqat_cli.models import attach_backend
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    arch = get_registry().architecture_for("llama")
    model = build(config)
    rtn_quantize_model(model, arch, QuantScheme(bits, group))
    attach_backend(model, "cpu", bits, "cpu", group, arch=arch)
    return model


@pytest.mark.parametrize("config", [tiny_llama_config, tiny_llama3_config])
def test_compact_step_static_cache_equals_transformers(config):
    from eqat_cli.decode import Decoder

    model = _rtn(config())
    ids = list(range(5, 25))
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0]
        for act, tol in (("fp32", 1e-5), ("int8", 2e-2)):
            dec = Decoder(model, act)
            dec.reset(32)
            got = [dec.forward(ids[:12])] + [dec.forward([i]) for i in ids[12:]]
            for pos, logits in zip(range(11, 20), got):
                assert (logits - full[pos]).abs().max() <= tol * full.abs().max(), (act, pos)


def test_generate_fp32_compact_step_gives_hf_greedy_tokens():
    from eqat_cli.decode import build_decoder
    from eqat_cli.generate import Generator, SamplingConfig

    model = _rtn(tiny_llama_config())
    gen = Generator(model, None, [], 256)
    cfg = SamplingConfig(max_new_tokens=24, ignore_eos=True)
    ids = [3, 17, 42, 99, 7]

    class Tok:  # the stream decodes ids to text
        def decode(self, ids, **kw):
            return "".join(chr(65 + i % 26) for i in ids)

    gen.tokenizer = Tok()
    ref = gen.generate(ids, cfg).token_ids
    gen.decoder = build_decoder(model, "fp32")
    assert gen.generate(ids, cfg).token_ids == ref
    gen.decoder = build_decoder(model, "int8")
    assert len(gen.generate(ids, cfg).token_ids) == 24


def test_unsupported_models_keep_transformers_forward():
    from conftest import tiny_gemma3_config, tiny_mistral_config
    from eqat_cli.decode import build_decoder, supported

    assert supported(build(tiny_mistral_config())) == "sliding-window attention"
    assert build_decoder(build(tiny_gemma3_config())) is None


@pytest.mark.parametrize("bits", [4, 8])
def test_head_packed_in_row_blocks_equals_whole_table(bits):
    from torch import nn

    from eqat_cli.quant.linear import QuantLinear
    from eqat_cli.quantize import _pack_rows_chunked

    lin = nn.Linear(96, 300, bias=False)
    whole = QuantLinear(lin, QuantScheme(bits, 64)).to_packed()
    blocks = _pack_rows_chunked(lin.weight.detach(), QuantScheme(bits, 64), chunk=40)
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(whole, name), getattr(blocks, name)), name
