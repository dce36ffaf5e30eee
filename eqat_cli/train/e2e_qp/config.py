"""E2E-QP configuration: the options of a run and the batch split they imply."""

from __future__ import annotations

from dataclasses import dataclass

from eqat_cli.device import PRECISIONS
from eqat_cli.errors import BadInputError
from eqat_cli.scheme import QuantScheme, check_bits

LOSSES = ("ntp", "kd")


@dataclass(frozen=True)
class E2EConfig:
    epochs: int = 1
    lr: float | None = None  # paper: 2e-5 at 2 bits, 1e-5 otherwise
    global_batch: int = 32  # examples per optimizer step over all processes (paper: 4 x 8 accumulation)
    batch_size: int = 4  # at most this many examples per process per micro-step
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 0.3
    weight_decay: float = 0.0
    eval_steps: int = 64  # 0: evaluate at the end of each epoch only
    save_steps: int = 50
    train_zeros: bool = False
    gradient_checkpointing: bool = True
    seed: int = 2
    loss: str = "kd"
    # autocast of the training forwards: "auto" is bf16 on GPUs and on CPUs with bf16 units, else
    # fp32 (fp16 with loss scaling on GPUs without bf16); or fp32 / bf16 / fp16
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def resolved_lr(self, bits: int | QuantScheme) -> float:
        """The peak learning rate: ``lr``, or the paper's for the model's bits (the widest bit
        width of a model whose layers mix schemes, so a bit width rather than one scheme)."""
        bits = bits.bits if isinstance(bits, QuantScheme) else check_bits(bits)
        if self.lr is not None:
            return self.lr
        return 2e-5 if bits == 2 else 1e-5

    def micro_batches(self, world_size: int) -> tuple[int, int]:
        """``(micro_batch, accumulation)`` per process so that ``micro * accum * world == global``."""
        if self.global_batch % world_size:
            raise BadInputError(f"--global-batch {self.global_batch} is not divisible by the {world_size} processes")
        share = self.global_batch // world_size
        micro = min(self.batch_size, share)
        if share % micro:
            raise BadInputError(f"--global-batch {self.global_batch} over {world_size} process(es) gives {share} "
                                f"examples each, not a multiple of --batch-size {micro}")
        return micro, share // micro
