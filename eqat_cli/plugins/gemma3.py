"""Gemma-3 text models (``Gemma3ForCausalLM``, model_type ``gemma3_text``: Gemma-3 1B and the text
part of larger checkpoints saved on their own).

Differences from Llama that the spec does not need to spell out, because they live inside modules
the spec points at: the embedding multiplies by sqrt(hidden_size) itself; each block has four norms
(before/after attention and MLP) and q/k norms; sliding-window and global layers alternate 5:1, each
type with its own RoPE base, which ``ArchitectureSpec.block_kwargs`` picks per layer from the
config's ``layer_types``. The quantized linears are Llama's.
"""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugins.llama import LLAMA, LLAMA_LINEARS
from eqat_cli.specs import replace

GEMMA3 = replace(
    LLAMA,
    name="gemma3",
    model_types=("gemma3_text",),
    description="Gemma-3 text models (scaled embeddings, 4 norms per block, 5:1 sliding/global layers)",
    norm_gain_offset=1.0,  # Gemma3RMSNorm: x_normed * (1 + weight), for norm scale pairs
    # post_attention_layernorm here normalizes o_proj's output; gate/up read pre_feedforward_layernorm
    residual_readers=(("input_layernorm", LLAMA_LINEARS[0]), ("pre_feedforward_layernorm", LLAMA_LINEARS[2])),
    rotation_blocker=(
        "Gemma-3 normalizes o_proj's and down_proj's outputs (post-attention and post-feedforward "
        "RMSNorms) before adding them to the residual stream, so a rotation of the stream cannot be "
        "folded into the weights exactly"
    ),
)


@hookimpl
def register_architectures(register):
    register(GEMMA3)
