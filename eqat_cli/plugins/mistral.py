"""Mistral: Llama's layout (sliding-window attention is handled inside the HF block)."""

from eqat_cli.hookspecs import hookimpl
from eqat_cli.plugins.llama import LLAMA
from eqat_cli.specs import replace

MISTRAL = replace(LLAMA, name="mistral", model_types=("mistral",), description="Mistral 7B family")


@hookimpl
def register_architectures(register):
    register(MISTRAL)
