"""Qwen2 / Qwen2.5: Llama's layout with biases on q/k/v; sliding-window attention (when the config
turns it on) only from ``max_window_layers`` on, which the layer-aware ``block_kwargs`` follows."""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugins.llama import LLAMA
from eqat_cli.specs import replace

QWEN2 = replace(
    LLAMA,
    name="qwen2",
    model_types=("qwen2",),
    description="Qwen2 / Qwen2.5 (q/k/v biases, sliding window on the upper layers when enabled)",
)


@hookimpl
def register_architectures(register):
    register(QWEN2)
