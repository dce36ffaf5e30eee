"""Llama family: Llama-2, Llama-3 (GQA, llama3 rope scaling), SmolLM2 and other `llama` models."""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.specs import ArchitectureSpec

LLAMA_LINEARS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

# down_proj(act(gate_proj(x)) * up_proj(x)) is linear in up_proj's output, channel by channel.
# The RMSNorm gains could move into q/k/v and gate/up the same way; on SmolLM2 adding those two
# pairs made Block-AP worse than this pair alone at 2 and 4 bits (docs/RESULTS.md), so they are
# not declared.
LLAMA_SCALE_PAIRS = (("mlp.up_proj", ("mlp.down_proj",)),)

# The residual stream: the pre-attention norm feeds q/k/v, the pre-MLP norm gate/up; o_proj and
# down_proj add to the stream (derived: the linears no norm feeds).
LLAMA_RESIDUAL_READERS = (
    ("input_layernorm", LLAMA_LINEARS[0]),
    ("post_attention_layernorm", LLAMA_LINEARS[2]),
)

LLAMA = ArchitectureSpec(
    name="llama",
    model_types=("llama",),
    layers_path="model.layers",
    embed_path="model.embed_tokens",
    norm_path="model.norm",
    rotary_path="model.rotary_emb",
    lm_head_path="lm_head",
    linear_groups=LLAMA_LINEARS,
    scale_pairs=LLAMA_SCALE_PAIRS,
    residual_readers=LLAMA_RESIDUAL_READERS,
    description="Llama-2, Llama-3 (GQA, llama3 rope scaling), SmolLM2",
)


@hookimpl
def register_architectures(register):
    register(LLAMA)
