"""Block-AP configuration: the default recipe, the paper's recipe, and their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from eqat_cli.device import PRECISIONS
from eqat_cli.errors import BadInputError
from eqat_cli.quant.targets import parse_target
from eqat_cli.progress import Progress, no_progress  # noqa: F401 (re-exported)
from eqat_cli.scheme import SUPPORTED_BITS, QuantScheme
from eqat_cli.train.runs import NonFiniteLossError  # noqa: F401 (re-exported)

LOSSES = ("mse", "token-rel")
INITS = ("minmax", "gptq")
PARAMS = ("free", "round", "auto")
OPTIMIZERS = ("adamw", "sign")
SCHEDULES = ("cosine", "linear")
BESTS = ("last", "val", "train")
RECIPES = ("default", "paper")


@dataclass(frozen=True)
class BlockAPConfig:
    """How Block-AP trains each block. The field defaults are eqat's default recipe; the paper's
    recipe, exactly as published, is :meth:`paper`.

    * ``param``: ``free`` trains the weights, step sizes and zero points (the paper);
      ``round`` keeps the starting weights and learns a rounding offset per weight and two
      clipping factors per group (:class:`~eqat_cli.quant.rounding.RoundQuantLinear`);
      ``auto`` (the default recipe) picks one by the steps per block (:func:`auto_param`).
      :meth:`resolve` makes it concrete; the run key and the checkpoint record the choice.
    * ``optimizer`` / ``schedule``: ``adamw`` + ``cosine`` (the paper) or ``sign`` (signed gradient
      descent: every step moves each parameter by exactly the learning rate, the natural unit for
      offsets and factors) + ``linear``; ``None`` follows the parametrisation (``sign``/``linear``
      for ``round``, ``adamw``/``cosine`` for ``free``).
    * ``epochs`` / ``steps``: ``steps`` optimizer steps per block, or (``steps=0``) ``epochs`` passes
      over the windows. ``epochs=None`` (the default recipe) follows the calibration budget:
      ``AUTO_EPOCHS`` passes, but at least ``MIN_STEPS`` steps (4 epochs of 64 windows at batch 8,
      2 epochs of 128), so a bigger calibration set buys more steps, while the cost per window stays
      that of two passes.
    * ``quant_lr`` / ``weight_lr``: ``None`` means the recipe's value: the paper's 1e-4 and
      2e-5 (2-bit) / 1e-5 for ``free``; ``1 / steps`` for ``round`` (offsets then travel at most half
      a step under the linear schedule, the whole range they are allowed).
    * ``precision``: autocast of the training forwards: ``auto`` is bf16 on GPUs and on CPUs with
      bf16 units (AVX512-BF16, AMX), fp16 on GPUs without bf16 (with loss scaling), else fp32.
      Targets, the quantized chain and every loss stay fp32.
    * ``channel_scale``: before a block starts, move per-channel scales within the architecture's
      scale pairs (norm gains into q/k/v and gate/up columns, ``up_proj`` rows into ``down_proj``
      columns) with AWQ's search on the block's own inputs (:mod:`eqat_cli.quant.scaling`); the
      block computes the same function, and its quantization starts from grids that protect the
      channels with large activations. ``None`` (the default recipe): on at
      ``CHANNEL_SCALE_MAX_BITS`` bits and below, where it measurably helps.
    * ``best``: which parameters a block ends with: ``last``; ``val``, the best validation loss at
      an epoch end, the start included; ``train``, the lowest training-batch loss seen at any step.
    """

    bits: int = 2
    group_size: int = 64
    recipe: str = "default"
    param: str = "auto"  # resolve(): round below AUTO_FREE_MIN_STEPS steps per block, else free
    optimizer: str | None = None  # None: follows param
    schedule: str | None = None  # None: follows param
    epochs: int | None = None  # None: AUTO_EPOCHS, at least MIN_STEPS steps (see total_steps)
    steps: int = 0
    batch_size: int = 8
    quant_lr: float | None = None
    weight_lr: float | None = None
    min_lr_factor: float = 20.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    early_stop: int = 0
    seed: int = 2
    offload_to_disk: bool = False
    loss: str = "token-rel"  # chosen on the C4 hold-out at 2/3/4 bits (docs/RESULTS.md, issue #13)
    init: str = "minmax"
    gptq_damp: float = 0.01
    best: str = "val"
    keep_best: bool = False  # the older spelling of best="val"
    channel_scale: bool | None = None  # None: on at CHANNEL_SCALE_MAX_BITS bits and below
    precision: str = "auto"  # training forwards: bf16 where the device computes it natively, else fp32
    avg_bits: float | None = None  # mixed precision: a width per layer, mean code width <= this (train/block_ap/mixed.py)
    param_auto: bool = False  # set by resolve(): param was "auto" and the steps per block chose it
    target: str | None = None  # gguf:q2_k | gguf:q3_k | gguf:q4_k: train on that GGML grid (quant/kquant.py)

    def __post_init__(self) -> None:
        QuantScheme(self.bits, self.group_size)  # one line on unsupported bits or a bad group size
        for name, allowed in (("loss", LOSSES), ("init", INITS), ("param", PARAMS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("best", BESTS), ("recipe", RECIPES),
                             ("precision", PRECISIONS)):
            value = getattr(self, name)
            if value is None and name in ("optimizer", "schedule"):
                continue
            if value not in allowed:
                raise BadInputError(f"unknown Block-AP {name} {value!r}; choose one of {', '.join(allowed)}")
        if not 0 < self.gptq_damp < 1:
            raise BadInputError(f"--gptq-damp must be in (0, 1), got {self.gptq_damp:g}")
        if (self.epochs is not None and self.epochs < 0) or self.steps < 0 or self.batch_size < 1:
            raise BadInputError("--epochs and --steps must be >= 0 and --batch-size >= 1")
        for name in ("quant_lr", "weight_lr", "max_grad_norm"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be >= 0, got {v:g}")
        if not self.min_lr_factor >= 1:
            raise BadInputError(f"--min-lr-factor must be >= 1, got {self.min_lr_factor:g}")
        if self.keep_best:
            object.__setattr__(self, "best", "val")
        if self.avg_bits is not None:
            lo, hi = min(SUPPORTED_BITS), max(SUPPORTED_BITS)
            if isinstance(self.avg_bits, bool) or not lo <= self.avg_bits <= hi:
                raise BadInputError(f"--avg-bits must be between {lo} and {hi} (the widths "
                                    f"{', '.join(map(str, SUPPORTED_BITS))}), got {self.avg_bits!r}")
        if self.avg_bits is not None and self.target is not None:
            raise BadInputError(f"--avg-bits (a width per layer) and --target {self.target} (every layer on one "
                                "GGML grid) cannot be combined")
        if self.target is not None:
            object.__setattr__(self, "target", f"gguf:{parse_target(self.target).lower()}")
            if self.param == "auto":  # the GGML grid is trained as rounding offsets and scale factors
                object.__setattr__(self, "param", "round")
            if self.param != "round" or self.init != "minmax":
                raise BadInputError(
                    f"--target {self.target} trains rounding offsets and sub-block scale factors on the "
                    f"GGML grid from its own start: it needs --param round and --init minmax "
                    f"(got --param {self.param}, --init {self.init})")

    @property
    def target_type(self) -> str | None:
        """The GGML type of ``target`` (``Q2_K`` ...), or None."""
        return parse_target(self.target)

    @classmethod
    def paper(cls, **overrides) -> "BlockAPConfig":
        """The paper's recipe (EfficientQAT, Block-AP), with ``overrides`` on top."""
        return cls(**{**PAPER, **overrides})

    @classmethod
    def from_recipe(cls, recipe: str, **overrides) -> "BlockAPConfig":
        if recipe not in RECIPES:
            raise BadInputError(f"unknown Block-AP recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        return cls.paper(**overrides) if recipe == "paper" else cls(**overrides)

    def resolve(self, n_windows: int) -> "BlockAPConfig":
        """This recipe made concrete for ``n_windows`` training windows: ``param="auto"`` becomes
        the parametrisation :func:`auto_param` picks for the steps per block, and an unset
        optimizer/schedule the one that goes with it. A concrete config resolves to itself."""
        param = auto_param(self.total_steps(n_windows)) if self.param == "auto" else self.param
        return dataclasses.replace(
            self, param=param, param_auto=self.param_auto or self.param == "auto",
            optimizer=self.optimizer or ("sign" if param == "round" else "adamw"),
            schedule=self.schedule or ("linear" if param == "round" else "cosine"))

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size)

    @property
    def trains(self) -> bool:
        return self.epochs is None or self.epochs > 0 or self.steps > 0

    @property
    def resolved_channel_scale(self) -> bool:
        if self.channel_scale is not None:
            return self.channel_scale
        return self.bits <= CHANNEL_SCALE_MAX_BITS

    def channel_scale_at(self, bits: int) -> bool:
        """Channel scaling for a block whose scale pairs' consumers are ``bits`` wide (mixed
        precision decides per block, by the same rule as :attr:`resolved_channel_scale`)."""
        return self.channel_scale if self.channel_scale is not None else bits <= CHANNEL_SCALE_MAX_BITS

    def resolved_epochs(self, n_windows: int) -> int:
        """Passes over ``n_windows`` (``epochs``, or the budget rule when it is ``None``)."""
        if self.epochs is not None:
            return self.epochs
        per_epoch = -(-n_windows // self.batch_size)
        return max(AUTO_EPOCHS, -(-MIN_STEPS // per_epoch))

    def total_steps(self, n_windows: int) -> int:
        if self.steps:
            return self.steps
        return -(-n_windows // self.batch_size) * self.resolved_epochs(n_windows)

    def resolved_weight_lr(self, total_steps: int | None = None) -> float | None:
        """The weight (``free``) or offset (``round``) learning rate; ``None`` while it depends on
        a step count that is not known yet."""
        if self.weight_lr is not None:
            return self.weight_lr
        if self.param == "free":
            return 2e-5 if self.bits == 2 else 1e-5
        if self.param == "auto":
            return None
        return None if not total_steps else 1.0 / total_steps

    def resolved_quant_lr(self, total_steps: int | None = None) -> float | None:
        """The step size / zero point (``free``) or clipping factor (``round``) learning rate."""
        if self.quant_lr is not None:
            return self.quant_lr
        if self.param == "free":
            return 1e-4
        if self.param == "auto":
            return None
        return None if not total_steps else 1.0 / total_steps

    def describe_param(self) -> str:
        """``round``/``free``, and why when ``auto`` chose it (for run summaries)."""
        if not self.param_auto:
            return self.param
        return f"{self.param} (auto: {'>=' if self.param == 'free' else '<'} {AUTO_FREE_MIN_STEPS} steps per block)"

    def describe_lr(self) -> str:
        if self.param == "auto":
            return "by the parametrisation the steps per block choose"

        def fmt(v):
            return "1/steps" if v is None else f"{v:g}"
        return f"{fmt(self.resolved_quant_lr())} ({'s, z' if self.param == 'free' else 'clipping'}) / " \
               f"{fmt(self.resolved_weight_lr())} ({'weights' if self.param == 'free' else 'offsets'})"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_lr"] = self.resolved_weight_lr()
        d["quant_lr"] = self.resolved_quant_lr()
        d["channel_scale"] = self.resolved_channel_scale
        return d


# The default recipe's budget rule (``epochs=None``): two passes over the calibration windows, and
# never fewer than 32 optimizer steps per block (what 64 windows at batch 8 give in 4 epochs).
AUTO_EPOCHS = 2
MIN_STEPS = 32
# param="auto": learned rounding (round) below this many optimizer steps per block, the paper's
# free weights from it on. On single SmolLM2 blocks, scored on held-out windows, round beat free
# and the round-then-free hybrid at every budget measured, 32 and 128 steps of batch 2
# (bench/crossover_probe.py, bench/results/s14/crossover.json; README "Which recipe at which
# budget"); larger budgets did not fit this session's CPU. 1024 steps of the default batch 8 are
# the paper's budget in windows seen (4096 steps of batch 2, where its free weights give
# Llama-2-7B w2g64 6.86), so a run at the paper's calibration size trains the paper's way; the
# crossover between 128 and that budget is not located yet.
AUTO_FREE_MIN_STEPS = 1024


def auto_param(total_steps: int) -> str:
    """The parametrisation ``param="auto"`` trains with for ``total_steps`` steps per block."""
    return "free" if total_steps >= AUTO_FREE_MIN_STEPS else "round"


# Channel scaling's default: on at this many bits and below. On SmolLM2 (C4 hold-out, default
# recipe, 64 x 256 windows) it took w2g64 from 138.6 to 116.8 and left w4g64 within run-to-run
# noise (37.44 without; 37.13 and 37.52 with) for ~25 % more Block-AP time (docs/RESULTS.md).
CHANNEL_SCALE_MAX_BITS = 3

# The paper: Block-AP as published (EfficientQAT, Sec. 3 and its scripts).
PAPER = dict(recipe="paper", param="free", optimizer="adamw", schedule="cosine", epochs=2, steps=0,
             batch_size=2, quant_lr=1e-4, weight_lr=None, min_lr_factor=20.0, loss="mse", init="minmax",
             best="last", channel_scale=False)


def legacy_defaults() -> dict:
    """Values of options missing from a run key written by an older eqat: every option added
    since was added with the paper's behaviour as its default."""
    d = BlockAPConfig.paper().to_json()
    d.pop("param_auto")  # how param was chosen is recorded, but not part of a run key
    return d
