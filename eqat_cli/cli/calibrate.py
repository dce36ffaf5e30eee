"""``eqat calibrate``: draw calibration windows from a corpus and save them."""

from __future__ import annotations

from typing import Annotated

import typer

from eqat_cli.cli.common import (
    AT_LEAST_1, NON_NEGATIVE, DataDirOpt, ModelArg, OutOpt, OverwriteOpt, Range, SeedOpt, TrustRemoteCodeOpt,
    console,
)

DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="redpajama, c4, wikitext2, or a .txt/.jsonl/.parquet file.")
]


def calibrate_cmd(
    model: ModelArg,
    dataset: DatasetOpt,
    output: OutOpt,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Training windows."), AT_LEAST_1] = 4096,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per window."), Range(ge=2)] = 2048,
    val_samples: Annotated[int, typer.Option("--val-samples", help="Validation windows (disjoint text)."), NON_NEGATIVE] = 64,
    seed: SeedOpt = 2,
    data_dir: DataDirOpt = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
):
    """Train and validation windows come from disjoint parts of the corpus; the same seed gives
    the same file. The file records the tokenizer, and Block-AP refuses it for another model.

    Example: [bold]eqat calibrate smollm2 --dataset c4 --samples 128 --seqlen 512 -o calib.safetensors[/]
    """
    from eqat_cli.fsutil import check_output
    from eqat_cli.models import preflight_model
    from eqat_cli.train.calib import calibrate, save_calibration

    check_output(output, overwrite, kind="file")
    preflight_model(model)
    with console.status(f"reading and tokenizing {dataset}..."):
        calib, _, _ = calibrate(model, dataset, samples, seqlen, val_samples, seed, data_dir)
    save_calibration(calib, output)
    console.print(
        f"wrote {output}: {samples} train + {val_samples} validation windows of {seqlen} tokens "
        f"from {dataset} (seed {seed}, tokenizer {calib.meta['tokenizer_fingerprint']})"
    )
