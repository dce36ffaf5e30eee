"""Architecture specs are data; running a block through the spec reproduces the model itself."""

import pytest
import torch
from torch import nn

from eqat_cli.registry import get_registry


def _capture(model, layers, input_ids):
    ins, outs = [], []

    def hook(module, args, kwargs, out):
        ins.append(args[0] if args else kwargs["hidden_states"])
        outs.append(out)

    hooks = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in hooks:
        h.remove()
    return ins, outs


# A deprecated transformers argument would be an error once it is removed: keep the call clean.
@pytest.mark.filterwarnings("error::FutureWarning")
def test_block_runner_reproduces_model(tiny_any):
    name, model = tiny_any
    arch = get_registry().architecture_for(model.config.model_type)
    layers = arch.layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == arch.text_config(model.config).num_hidden_layers
    ids = torch.randint(0, 200, (2, 24))
    ins, outs = _capture(model, layers, ids)
    for i, layer in enumerate(layers):
        with torch.no_grad():
            got = layer(ins[i], **arch.block_kwargs(model, ins[i], i))
        torch.testing.assert_close(got, outs[i], rtol=1e-5, atol=1e-5)
    # Chaining blocks from the embedding reproduces the last block's output.
    h = arch.embed(model)(ids)
    with torch.no_grad():
        for layer in layers:
            h = layer(h, **arch.block_kwargs(model, h, layer))
    torch.testing.assert_close(h, outs[-1], rtol=1e-5, atol=1e-5)


def test_linear_layers_in_forward_order(tiny_any):
    name, model = tiny_any
    arch = get_registry().architecture_for(model.config.model_type)
    block = arch.layers(model)[0]
    for lin in arch.linear_names:
        assert isinstance(block.get_submodule(lin), nn.Linear)
    order = []
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: order.append(n) and None) for n in arch.linear_names]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (1, 8)))
    for h in hooks:
        h.remove()
    first_block = order[: len(arch.linear_names)]
    # Within a group the order is free (they share the input); groups follow forward order.
    pos = {n: i for i, n in enumerate(first_block)}
    flat_groups = [[pos[n] for n in g] for g in arch.linear_groups]
    for a, b in zip(flat_groups, flat_groups[1:]):
        assert max(a) < min(b)
    # Paths resolve
    assert arch.norm(model) is not None and arch.lm_head(model) is not None


def test_llava_keeps_vision_in_full_precision():
    from conftest import build, tiny_llava_config

    model = build(tiny_llava_config())
    arch = get_registry().architecture_for("llava")
    assert arch.full_precision_paths
    for path in arch.full_precision_paths:
        sub = model.get_submodule(path)
        layer_ids = {id(m) for m in arch.layers(model).modules()}
        assert not any(id(m) in layer_ids for m in sub.modules())
    assert arch.text_config(model.config).model_type == "llama"


def test_llama3_rope_scaling_is_used():
    from conftest import build, tiny_llama3_config

    model = build(tiny_llama3_config())
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    arch = get_registry().architecture_for("llama")
    h = torch.randn(1, 100, 64)
    cos, _ = arch.block_kwargs(model, h, 0)["position_embeddings"]
    from conftest import tiny_llama_config

    plain = build(tiny_llama_config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    cos_plain, _ = arch.block_kwargs(plain, h, 0)["position_embeddings"]
    assert not torch.allclose(cos, cos_plain)  # llama3 scaling changes the low frequencies
