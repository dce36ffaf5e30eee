"""Training targets that are GGML types (``--target gguf:q2_k`` ...): names and llama.cpp's fallbacks.

Torch-free (read by configs and the CLI); the grids themselves are :mod:`eqat_cli.quant.kquant`.
"""

from __future__ import annotations

from eqat_cli.errors import BadInputError

QK_K = 256  # the k-quants' super-block
TARGETS = {"gguf:q2_k": "Q2_K", "gguf:q3_k": "Q3_K", "gguf:q4_k": "Q4_K"}
# llama.cpp src/llama-quant.cpp (llama_tensor_get_type): the type a row that is not a multiple of
# QK_K gets instead of a k-quant
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0"}


def parse_target(text: str | None) -> str | None:
    """``gguf:q2_k`` / ``gguf:q3_k`` / ``gguf:q4_k`` -> the GGML type name; ``None`` stays ``None``."""
    if text is None or text == "":
        return None
    t = text.strip().lower()
    if t not in TARGETS:
        raise BadInputError(f"unknown --target {text!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[t]
