"""``eqat eval``: perplexity and zero-shot accuracy of any model the resolver accepts."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from eqat_cli.cli.common import (
    BackendOpt,
    QuantizeHeadOpt,
    DataDirOpt,
    DeviceOpt,
    JsonOpt,
    ModelArg,
    AT_LEAST_1,
    Range,
    TrustRemoteCodeOpt,
    console,
    counting_bars,
    emit_json,
    progress_bars,
)


def eval_cmd(
    model: ModelArg,
    ppl: Annotated[Optional[str], typer.Option("--ppl", help="Perplexity sets, e.g. wikitext2,c4.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Zero-shot tasks, e.g. piqa,arc_easy,hellaswag.")] = None,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Perplexity context length."), Range(ge=2)] = 2048,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate only N windows / examples."), AT_LEAST_1] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows / lm-eval requests per forward."), AT_LEAST_1] = 1,
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    quantize_head: QuantizeHeadOpt = None,
    data_dir: DataDirOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """Perplexity sets: wikitext2, c4, or a .txt/.raw/.jsonl/.parquet file.

    Tasks: piqa, arc_easy, hellaswag (local copies with --data-dir), or any lm-eval task.

    Example: [bold]eqat eval ./out --ppl wikitext2 --tasks piqa,arc_easy[/]
    """
    from eqat_cli.eval.runner import EvalConfig, split_list

    cfg = EvalConfig(
        model=model, ppl=split_list(ppl), tasks=split_list(tasks), seqlen=seqlen,
        limit=limit, batch_size=batch_size, device=device, backend=backend,
        data_dir=data_dir, head_bits=quantize_head,
    )
    results = _run(cfg)
    render(results)
    emit_json(results, json_out)


def _run(cfg: Any) -> dict:
    from eqat_cli.eval.runner import eval_from_spec

    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own bar replaces "Loading weights"
    bars = progress_bars(transient=True)
    what = {"load": "loading", "ppl": "windows", "task": "requests"}
    counting = counting_bars(bars, key=lambda event, info: (event, info["label"]),
                             describe=lambda event, info: f"{info['label']} ({what[event]})")

    def progress(event: str, info: dict) -> None:
        if event == "start":  # checked: now the model loads
            console.print(f"evaluating [bold]{info['model']}[/]")
            bars.start()
        else:
            counting(event, info)

    try:
        return eval_from_spec(cfg, progress)
    finally:
        bars.stop()


def short_source(source: str) -> str:
    """``local:/a/b/c.jsonl,/a/b/d.jsonl`` -> ``local c.jsonl, d.jsonl`` (full paths are in --json)."""
    from pathlib import PurePath

    kind, _, rest = source.partition(":")
    if kind in ("local", "file"):
        return f"{kind} " + ", ".join(PurePath(p).name for p in rest.split(","))
    return source


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(r: dict) -> None:
    """Human summary on stderr: model facts, perplexity table, zero-shot table."""
    from rich.table import Table

    from eqat_cli.cli.common import console

    bpw = r["bits_per_weight"]
    size = r["size_on_disk_bytes"]
    facts = [f"format [bold]{r['format']}[/]"]
    if r["quant"]:
        q = r["quant"]
        facts.append(f"w{q.get('bits')}g{q.get('group_size')}")
    if bpw.get("effective") is not None:
        facts.append(f"{bpw['effective']:.3f} bits/weight")
    if bpw.get("formula") is not None:
        facts.append(f"(formula {bpw['formula']:.3f})")
    if size is not None:
        facts.append(f"{size / 2**20:.1f} MiB on disk")
    facts.append(f"{r['device']} {r['dtype']}")
    console.print(" · ".join(facts))
    console.print(f"backend: {r['backend']}", soft_wrap=True)

    if r["perplexity"]:
        t = Table(title="Perplexity", title_justify="left")
        for col in ("set", "seqlen", "windows", "ppl", "source"):
            t.add_column(col, justify="right" if col in ("seqlen", "windows", "ppl") else "left",
                         no_wrap=col != "source")
        for name, p in r["perplexity"].items():
            win = f"{p['windows']}/{p['windows_available']}"
            t.add_row(name, str(p["seqlen"]), win, f"{p['ppl']:.3f}", short_source(p["source"]))
        console.print(t)
        for name, p in r["perplexity"].items():
            if p.get("note"):
                console.print(f"[yellow]note[/] ({name}): {p['note']}", soft_wrap=True)

    if r["zeroshot"]:
        t = Table(title="Zero-shot", title_justify="left")
        for col in ("task", "n", "acc", "acc_norm", "source"):
            t.add_column(col, justify="left" if col in ("task", "source") else "right",
                         no_wrap=col != "source")
        for key, z in r["zeroshot"].items():
            acc = f"{_fmt(z['acc'])} ± {_fmt(z['acc_stderr'])}" if z["acc"] is not None else "-"
            accn = (
                f"{_fmt(z['acc_norm'])} ± {_fmt(z['acc_norm_stderr'])}"
                if z["acc_norm"] is not None else "-"
            )
            t.add_row(key, f"{z['n']}/{z['n_total']}", acc, accn, short_source(z["source"]))
        console.print(t)
        for key, z in r["zeroshot"].items():
            if z.get("note"):
                console.print(f"[yellow]note[/] ({key}): {z['note']}", soft_wrap=True)
    console.print(f"[dim]done in {r['timing']['total_s']:.1f} s[/]")
