"""Gemma-3 text models (``Gemma3ForCausalLM``, model_type ``gemma3_text``: Gemma-3 1B and the text
part of larger checkpoints saved on their own).

Differences from Llama that the spec does not need to spell out, because they live inside modules
the spec points at: the embedding multiplies by sqrt(hidden_size) itself; each block has four norms
(before/after attention and MLP) and q/k norms; sliding-window and global layers alternate 5:1, each
type with its own RoPE base, which ``ArchitectureSpec.block_kwargs`` picks per layer from the
config's ``layer_types``. The quantized linears are Llama's.
"""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugins.llama import LLAMA
from eqat_cli.specs import replace

GEMMA3 = replace(
    LLAMA,
    name="gemma3",
    model_types=("gemma3_text",),
    description="Gemma-3 text models (scaled embeddings, 4 norms per block, 5:1 sliding/global layers)",
    norm_gain_offset=1.0,  # Gemma3RMSNorm: x_normed * (1 + weight), for norm scale pairs
)


@hookimpl
def register_architectures(register):
    register(GEMMA3)
