"""Qwen3 (dense): Llama's layout plus RMS norms on queries and keys inside attention. The norms
stay in full precision and train with the block's other non-linear parameters in Block-AP."""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugins.llama import LLAMA
from eqat_cli.specs import replace

QWEN3 = replace(
    LLAMA,
    name="qwen3",
    model_types=("qwen3",),
    description="Qwen3 dense models (q/k norms, no biases)",
)


@hookimpl
def register_architectures(register):
    register(QWEN3)
