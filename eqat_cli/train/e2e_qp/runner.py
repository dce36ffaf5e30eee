"""``eqat e2e-qp``'s library side: an E2E-QP run from a model spec, prepared and trained.

:func:`e2e_qp_from_spec` checks the options, joins a ``torchrun`` process group when launched by
one, takes the output's lock (rank 0; one writer per output), loads the packed student (refusing full-precision and non-native checkpoints), builds the
checkpoint metadata, loads the full-precision teacher (:func:`load_teacher`), reads the training
and held-out examples, then trains with :func:`eqat_cli.train.e2e_qp.run_e2e_qp`. No printing:
once prepared it reports ``progress("prepared", {...})`` (what is about to run), then the
trainer's own events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from eqat_cli.errors import BadInputError
from eqat_cli.formats.checkpoint import Checkpoint
from eqat_cli.formats.meta import CheckpointMeta
from eqat_cli.fsutil import check_output
from eqat_cli.models import preflight_model, resolve
from eqat_cli.progress import Progress, no_progress
from eqat_cli.readers import read_jsonl
from eqat_cli.train.e2e_qp.config import LOSSES, E2EConfig
from eqat_cli.train.e2e_qp.dist import init_distributed, world
from eqat_cli.train.e2e_qp.driver import E2EResult, run_e2e_qp
from eqat_cli.train.runs import run_lock
from eqat_cli.train.sft_data import training_examples

DATA_FORMATS = ("pt", "instruct")


def load_teacher(spec: str, student: Any, device: str):
    """The full-precision teacher for ``--loss kd``; refused unless it is FP with the student's vocabulary."""
    t = resolve(spec, device=device)
    if t.format != "fp":
        raise BadInputError(f"--teacher {spec} is a {t.format} checkpoint; the teacher must be full precision")
    tv, sv = t.model.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if tv != sv:
        raise BadInputError(f"--teacher {spec} has a vocabulary of {tv}, the quantized model {sv}: not its source model")
    return t.model


def e2e_qp_from_spec(
    model: str,
    dataset: str,
    output: Path,
    cfg: E2EConfig,
    *,
    data_format: str = "pt",
    teacher: Optional[str] = None,
    samples: int = 4096,
    seqlen: int = 4096,
    val_samples: int = 64,
    device: str = "auto",
    data_dir: Optional[Path] = None,
    progress: Progress = no_progress,
    resume: bool = True,
    overwrite: bool = False,
    wait: bool = False,
) -> E2EResult:
    """Train the step sizes of the packed model ``model`` (a model spec) on ``dataset``; write ``output``.

    ``teacher`` is the full-precision teacher's spec (default: the ``source_model`` the checkpoint
    records); it is loaded for ``cfg.loss == "kd"``, and with ``ntp`` only when given (it then adds
    the held-out KL to the evaluations). Before training, reports ``"prepared"`` with ``rank``,
    ``world_size``, ``device``, ``loss``, ``train``/``val`` (example counts), ``seqlen``, ``lr``,
    ``global_batch``, ``micro_batch`` and ``grad_accum``. Another process writing ``output`` is
    refused (:class:`~eqat_cli.errors.OutputBusyError`), or with ``wait`` waited for.
    """
    if data_format not in DATA_FORMATS:
        raise BadInputError(f"--format must be pt or instruct, got {data_format!r}")
    if cfg.loss not in LOSSES:
        raise BadInputError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    init_distributed()
    rank, ws = world()
    micro, accum = cfg.micro_batches(ws)
    check_output(output, overwrite)
    with run_lock(output, owner=rank == 0, wait=wait, progress=progress):
        check_output(output, overwrite)  # again: a run we waited for may have written it
        return _prepare_and_train(model, dataset, output, cfg, data_format, teacher, samples, seqlen, val_samples,
                                  device, data_dir, progress, resume, overwrite, rank, ws, micro, accum)


def _prepare_and_train(model, dataset, output, cfg, data_format, teacher, samples, seqlen, val_samples, device,
                       data_dir, progress, resume, overwrite, rank, ws, micro, accum) -> E2EResult:
    """Load the student (and teacher) and the examples, report ``prepared``, train."""
    if preflight_model(model) is False:
        raise BadInputError(f"{model} is not quantized; run `eqat block-ap` first")
    if data_format == "instruct":  # every line readable before the model is loaded
        for _ in read_jsonl(dataset, "instruction data file"):
            pass
    lm = resolve(model, device=device)
    if lm.format == "fp":
        raise BadInputError(f"{model} is not quantized; run `eqat block-ap` first")
    if lm.format != "eqat":
        raise BadInputError(f"{model} is a {lm.format} checkpoint; E2E-QP trains eqat/EfficientQAT native models")
    bits = lm.quant["bits"] if isinstance(lm.quant["bits"], int) else max(lm.quant["bits"])
    eqat_meta = Checkpoint.open(lm.path).meta or CheckpointMeta()
    teacher_model = None
    if cfg.loss == "kd" or teacher:  # with ntp, a teacher adds the held-out KL to the evaluations
        spec = teacher or eqat_meta.source_model
        if not spec:
            raise BadInputError(f"{model} does not record the model it was quantized from; pass --teacher MODEL "
                                f"(its full-precision source) or use --loss ntp")
        teacher_model = load_teacher(spec, lm.model, device)
    train, val = training_examples(dataset, lm.tokenizer, data_format, samples, seqlen, val_samples, cfg.seed,
                                   data_dir)
    dev = next(lm.model.parameters()).device
    if eqat_meta.scheme is None and "bits" not in eqat_meta.extra:
        eqat_meta = eqat_meta.updated({"bits": bits, "group_size": lm.quant["group_size"]})
    if eqat_meta.architecture is None:
        eqat_meta = eqat_meta.updated(architecture=lm.arch.name)
    progress("prepared", {"rank": rank, "world_size": ws, "device": str(dev), "loss": cfg.loss,
                          "train": len(train), "val": len(val), "seqlen": seqlen, "lr": cfg.resolved_lr(bits),
                          "global_batch": cfg.global_batch, "micro_batch": micro, "grad_accum": accum})
    return run_e2e_qp(lm.model, lm.tokenizer, train, val, cfg, output, dev, bits, eqat_meta,
                      progress=progress, resume=resume, overwrite=overwrite, teacher=teacher_model)
