"""What a benchmark run is asked to do: :class:`BenchConfig`, its defaults and their validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from eqat_cli.errors import BadInputError
from eqat_cli.progress import Progress, no_progress  # noqa: F401 (re-exported)
from eqat_cli.scheme import SUPPORTED_BITS, QuantScheme

DEFAULT_PROMPT = "The three most important ideas in the history of computing are"
LAYER_REPEATS = 10
GENERATION_REPEATS = 3


@dataclass(frozen=True)
class BenchConfig:
    bits: int = 2
    group: int = 64
    shapes: str = "llama-2-7b"  # a preset name or a model spec (path, alias, Hub id, .gguf)
    backend: str = "auto"
    device: str = "auto"
    prefill_tokens: int = 512
    repeats: Optional[int] = None  # None: LAYER_REPEATS for layers, GENERATION_REPEATS for models
    warmup: int = 2  # untimed layer runs (generation: one untimed run)
    new_tokens: int = 32
    threads: Optional[int] = None
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    generation: bool = True  # with a model spec, also time generation
    compare: tuple[str, ...] = ()  # more backends timed on the same packed layers (and models)
    head_bits: Optional[int] = None  # quantize the embedding and lm_head of the model (8 or 4)

    @property
    def scheme(self) -> QuantScheme:
        """``--bits`` and ``--group`` as one validated scheme."""
        return QuantScheme(self.bits, self.group)

    @property
    def layer_repeats(self) -> int:
        return self.repeats or LAYER_REPEATS

    @property
    def generation_repeats(self) -> int:
        return self.repeats or GENERATION_REPEATS

    @property
    def batches(self) -> list[int]:
        return sorted({1, self.prefill_tokens})

    def validate(self) -> None:
        """Fail fast on bad numbers, before anything heavy is loaded."""
        QuantScheme(self.bits, self.group)  # one-line errors for bad bits or group
        if self.repeats is not None and self.repeats < 2:
            raise BadInputError(
                f"--repeats must be at least 2 (a median needs a spread), got {self.repeats}"
            )
        for name, value, low in (
            ("--prefill-tokens", self.prefill_tokens, 1),
            ("--new-tokens", self.new_tokens, 1),
            ("--warmup", self.warmup, 0),
        ):
            if value < low:
                raise BadInputError(f"{name} must be at least {low}, got {value}")
        if self.head_bits not in (None, 4, 8):
            raise BadInputError(f"--quantize-head must be 4 or 8, got {self.head_bits}")
        if self.threads is not None and self.threads < 1:
            raise BadInputError(f"--threads must be at least 1, got {self.threads}")
