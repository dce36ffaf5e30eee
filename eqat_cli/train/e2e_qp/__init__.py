"""E2E-QP: end-to-end training of step sizes with frozen integer codes (EfficientQAT, phase 2).

Only ``scales`` of every :class:`PackedLinear` train (``train_zeros`` adds zero points); codes stay
packed. AdamW, linear warmup then cosine, gradient clipping, gradient checkpointing, autocast
(``precision``: bf16 on GPUs and on CPUs with bf16 units, fp16 with loss scaling on other GPUs:
:mod:`eqat_cli.train.amp`). Held-out loss every
``eval_steps``; the best and the last step sizes are both kept.

Objectives (``loss``):

* ``ntp``: next-token cross-entropy on the learned tokens.
* ``kd``: distillation, ``KL(teacher || student)`` between the full-precision teacher's next-token
  distribution and the student's, on the same learned tokens (temperature 1). The teacher runs
  alongside (no gradient) on each micro-batch; see ``docs/RESULTS.md`` for why that was chosen
  over cached top-k logits or a block-streamed teacher.

Both are sums over the learned tokens of the whole *global* batch divided by their count, so
gradient accumulation and N processes give the gradient of one big batch however the batch is
split. Logits are only formed at learned positions, a chunk of tokens at a time.

Global batch: ``global_batch`` examples per optimizer step (the paper's 32), split over the
processes and into micro-batches of at most ``batch_size``; the accumulation count follows.
Data parallel over ``torch.distributed`` (``torchrun``): gradients are summed with ``all_reduce``.

Resumable: every ``save_steps`` the trainable tensors, optimizer moments, loss scale, best-so-far,
history and step are written atomically to one safetensors file (the scalars as JSON in its
header: nothing is unpickled on resume); data order and learning rate are pure functions of
(seed, step), so a resumed run is bit-identical to an uninterrupted one.

:func:`run_e2e_qp` is a sequence of named steps: check the inputs, plan the batch split and the
schedule (:class:`_Schedule`), prepare the student (and teacher), resume or start, train, write the
output. The steps share one :class:`_Run` (the models, optimizer and data) whose :class:`_TrainState`
(step, best-so-far, history) is what a resume file restores.

The rooms, mirroring :mod:`eqat_cli.train.block_ap`: :mod:`.config` (options, batch split),
:mod:`.dist` (``torchrun``), :mod:`.student` (trainable layers, kernel, checkpointing),
:mod:`.losses`, :mod:`.evaluate`, :mod:`.state` (the resume file), :mod:`.driver` (the run) and
:mod:`.runner` (``eqat e2e-qp``'s library side, :func:`e2e_qp_from_spec`). The run's skeleton (lock,
work directory, run key, atomic state, output check) is :mod:`eqat_cli.train.runs` and the
learning-rate schedule :mod:`eqat_cli.train.schedule`, both shared with Block-AP.
"""

from eqat_cli.train.e2e_qp.config import LOSSES, E2EConfig
from eqat_cli.train.e2e_qp.dist import init_distributed, world
from eqat_cli.train.e2e_qp.driver import E2EResult, run_e2e_qp
from eqat_cli.train.e2e_qp.evaluate import evaluate, evaluate_loss
from eqat_cli.train.e2e_qp.losses import LOGIT_CHUNK, loss_sums
from eqat_cli.train.e2e_qp.state import STATE_FILE, STATE_KEY
from eqat_cli.train.e2e_qp.student import (
    _disable_checkpointing, _enable_checkpointing, prepare_student, trainable_layers, training_kernel,
)
from eqat_cli.train.runs import WORK_SUFFIX, NonFiniteLossError
from eqat_cli.train.schedule import warmup_cosine as lr_factor
from eqat_cli.train.schedule import warmup_steps
from eqat_cli.train.e2e_qp.runner import DATA_FORMATS, e2e_qp_from_spec, load_teacher  # noqa: E402 (imports the above)

__all__ = [
    "LOSSES", "E2EConfig", "init_distributed", "world", "E2EResult", "run_e2e_qp", "evaluate", "evaluate_loss",
    "LOGIT_CHUNK", "loss_sums", "STATE_FILE", "STATE_KEY", "prepare_student", "trainable_layers",
    "training_kernel", "WORK_SUFFIX", "NonFiniteLossError", "lr_factor", "warmup_steps", "DATA_FORMATS",
    "e2e_qp_from_spec", "load_teacher",
]
