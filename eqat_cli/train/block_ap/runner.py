"""``eqat block-ap``'s library side: a Block-AP run from a model spec, prepared and trained.

:func:`block_ap_from_spec` checks the options and the output, takes the output's lock (one writer
per output), checks the model, reads or draws the calibration windows (reporting
``calibration`` events around the reading and tokenizing), refuses a quantized source, picks the
device, reports ``prepared`` (what is about to run), then calls
:func:`eqat_cli.train.block_ap.driver.run_block_ap`. The CLI, the benchmarks and the tests call
this one function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from eqat_cli.device import pick_device
from eqat_cli.errors import BadInputError
from eqat_cli.fsutil import check_output, output_lock
from eqat_cli.model_files import check_full_precision_model
from eqat_cli.models import preflight_model
from eqat_cli.progress import Progress, no_progress
from eqat_cli.train.block_ap.config import BlockAPConfig
from eqat_cli.train.block_ap.driver import BlockAPResult, run_block_ap
from eqat_cli.train.calib import calibration_for


def block_ap_from_spec(
    model: str,
    output: Path,
    cfg: BlockAPConfig,
    *,
    calib: Optional[Path] = None,
    dataset: Optional[str] = None,
    samples: int = 4096,
    seqlen: int = 2048,
    val_samples: int = 64,
    device: str = "auto",
    data_dir: Optional[Path] = None,
    progress: Progress = no_progress,
    resume: bool = True,
    overwrite: bool = False,
    wait: bool = False,
) -> BlockAPResult:
    """Quantize ``model`` (a model spec) with Block-AP and write the packed checkpoint ``output``.

    The windows come from exactly one of ``calib`` (a file from ``eqat calibrate``) or ``dataset``
    (drawn on the fly: ``samples`` + ``val_samples`` windows of ``seqlen`` tokens, seed
    ``cfg.seed``). Another process writing ``output`` is refused
    (:class:`~eqat_cli.errors.OutputBusyError`), or with ``wait`` waited for
    (``progress("lock_wait", ...)``). Events before training: ``calibration``
    (``{"dataset", "done"}``, only with ``dataset``) and ``prepared`` (``{"device", "train",
    "val", "steps"}``: window shapes and steps per block); then the driver's own events.
    """
    if (calib is None) == (dataset is None):
        raise BadInputError("give exactly one of --calib FILE or --dataset NAME")
    check_output(output, overwrite)
    with output_lock(output, wait=wait, progress=progress):
        check_output(output, overwrite)  # again: a run we waited for may have written it
        preflight_model(model)
        if dataset is not None:
            progress("calibration", {"dataset": dataset, "done": False})
        try:
            c, tok, path = calibration_for(model, calib, dataset, samples, seqlen, val_samples, cfg.seed, data_dir)
        finally:
            if dataset is not None:
                progress("calibration", {"dataset": dataset, "done": True})
        check_full_precision_model(path)
        dev = pick_device(device)
        progress("prepared", {"device": str(dev), "train": tuple(c.train.shape), "val": tuple(c.val.shape),
                              "steps": cfg.total_steps(c.train.shape[0]), "config": cfg.resolve(c.train.shape[0])})
        return run_block_ap(
            path, tok, c.train, c.val, cfg, output, dev,
            extra_meta={"calibration": c.meta, "source_model": model},
            progress=progress, resume=resume, overwrite=overwrite,
        )
