"""The built-in output formats (eqat native, GPTQ v1/v2, dense fp16, GGUF Q4_1), registered
exactly as a third-party format plugin would register its own (see :mod:`eqat_cli.format_spec`)."""

from eqat_cli.formats.builtin import BUILTIN_FORMATS
from eqat_cli.hookspecs import hookimpl


@hookimpl
def register_formats(register):
    for fmt in BUILTIN_FORMATS:
        register(fmt)
