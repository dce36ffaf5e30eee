"""``eqat bench``: quantized vs dense layer latency and memory, and end-to-end generation."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from eqat_cli.cli.common import (
    AT_LEAST_1, BITS, GROUP, BackendOpt, QuantizeHeadOpt, DeviceOpt, JsonOpt, Range, TrustRemoteCodeOpt, console, counting_bars, emit_json,
    progress_bars,
)


def bench_cmd(
    bits: Annotated[int, typer.Option("--bits", "-b", help="Weight bits: 2, 3, 4 or 8."), BITS] = 2,
    group: Annotated[int, typer.Option("--group", "-g", help="Group size; -1 = per-channel."), GROUP] = 64,
    shapes: Annotated[str, typer.Option("--shapes", help="llama-2-7b, llama-3-8b, or a model spec (directory, Hub id, .gguf, alias 'smollm2'): its layer shapes, plus end-to-end generation.")] = "llama-2-7b",
    backend: BackendOpt = "auto",
    prefill_tokens: Annotated[int, typer.Option("--prefill-tokens", help="Rows of the prefill batch (decode is 1 row)."), AT_LEAST_1] = 512,
    repeats: Annotated[Optional[int], typer.Option("--repeats", help="Timed runs per figure (default: 10 for layers, 3 for generation).", show_default=False), Range(ge=2)] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per end-to-end run."), AT_LEAST_1] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads (default: torch's choice).", show_default=False), AT_LEAST_1] = None,
    device: DeviceOpt = "auto",
    compare_backend: Annotated[Optional[list[str]], typer.Option("--compare-backend", help="Also time this backend on the same packed layers and quantized model (repeatable), e.g. torch.", show_default=False)] = None,
    quantize_head: QuantizeHeadOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """For each distinct linear shape of the model: latency of the packed layer (random weights,
    min-max quantized, run by the selected backend) vs the dense layer (fp32 on CPU) at batch
    1 and a prefill batch, and the weight bytes of each. With a model spec, also greedy
    generation tokens/s and memory of the full-precision model vs the quantized one.

    Example: [bold]eqat bench --bits 2 --group 64 --shapes llama-2-7b[/]

    Example: [bold]eqat bench --shapes smollm2 --json bench.json[/]
    """
    from eqat_cli.benchmark import BenchConfig

    cfg = BenchConfig(
        bits=bits, group=group, shapes=shapes, backend=backend, device=device,
        prefill_tokens=prefill_tokens, repeats=repeats, new_tokens=new_tokens,
        threads=threads, compare=tuple(compare_backend or ()), head_bits=quantize_head,
    )
    cfg.validate()  # fail fast, before torch and the model are loaded
    results = _run(cfg)
    render(results)
    emit_json(results, json_out)


def _run(cfg: Any) -> dict:
    from eqat_cli.benchmark import bench_from_spec

    bars = progress_bars(transient=True)
    counting = counting_bars(bars, key=lambda event, info: event,
                             describe=lambda event, info: f"{event}: {info['label']}")

    def progress(event: str, info: dict) -> None:
        if event != "planned":
            counting(event, info)
            return
        p = info["plan"]
        console.print(f"backend: {p.backend['why']}", soft_wrap=True)
        m = p.shapes.model
        console.print(
            f"shapes of [bold]{p.shapes.name}[/] ({m['architecture']}, hidden {m['hidden_size']}, "
            f"{p.shapes.num_layers} blocks) · w{p.cfg.bits}g{p.cfg.group} · {p.device} "
            f"{str(p.dtype).replace('torch.', '')}",
            soft_wrap=True,
        )
        if p.shapes.source == "model":
            import transformers

            transformers.utils.logging.disable_progress_bar()
        bars.start()

    try:
        return bench_from_spec(cfg, progress)
    finally:
        bars.stop()


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f}"


def _spread(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def render(r: dict) -> None:
    """Human summary on stderr: machine, layer table, model totals, generation table."""
    from rich.table import Table

    mach = r["machine"]
    console.print(
        f"torch {mach['torch']} · {mach['threads']} threads · {mach['cpu_model']} · "
        f"{r['config']['repeats_layers']} runs per layer figure: median (min-max)",
        soft_wrap=True,
    )
    t = Table(title=f"Layers of {r['shapes']['name']} (ms per forward)", title_justify="left")
    others = r["backend"].get("compare", [])
    for col in ("layers", "in x out", "tokens", "dense", r["backend"]["name"], "time x",
                *[c for o in others for c in (o, f"{o} x")], "dense MiB", "packed MiB", "bytes x"):
        t.add_column(col, justify="left" if col == "layers" else "right", overflow="fold")
    for e in r["layers"]:
        wb = e["weight_bytes"]
        for i, row in enumerate(e["batches"]):
            first = i == 0
            t.add_row(
                e["label"].replace("_proj", "") if first else "",
                f"{e['in_features']}x{e['out_features']}" if first else "",
                str(row["tokens"]),
                _spread(row["dense"]),
                _spread(row["quant"]),
                f"{row['time_ratio']:.2f}",
                *[c for o in others for c in (
                    _spread(row[o]), f"{row[o]['median'] / row['dense']['median']:.2f}")],
                _mib(wb["dense"]) if first else "",
                _mib(wb["packed"]) if first else "",
                f"{e['memory_ratio']:.3f}" if first else "",
            )
    console.print(t)
    tot = r["model_totals"]
    console.print(
        f"decoder linear weights ({tot['num_layers']} blocks x {tot['linears_per_block']}): "
        f"{_mib(tot['dense_bytes'])} MiB dense -> {_mib(tot['packed_bytes'])} MiB packed "
        f"({tot['memory_ratio']:.3f}x); packed bytes = qweight+qzeros+scales+g_idx",
        soft_wrap=True,
    )
    gen = r.get("generation")
    if gen:
        variants = gen["variants"]
        if variants:
            g = Table(
                title=f"Generation: {r['config']['new_tokens']} greedy tokens, "
                      f"{r['config']['repeats_generation']} runs",
                title_justify="left",
            )
            for col in ("model", "tokens/s", "ms/token", "weights MiB", "RSS after load MiB",
                        "RSS peak gen MiB"):
                g.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
            for name in ("fp", "quant", *[f"quant-{o}" for o in others]):
                if name not in variants:
                    continue
                v = variants[name]
                g.add_row(
                    name, _spread(v["tokens_per_s"], 1), _spread(v["ms_per_token"], 1),
                    _mib(v["weight_bytes"]["total"]), _mib(v["rss"]["after_load_delta"]),
                    _mib(v["rss"]["generate_peak_delta"]),
                )
            console.print(g)
            from rich.markup import escape

            for name, v in variants.items():
                console.print(f"[dim]{name}: {escape(v['description'])}[/]", soft_wrap=True)
            console.print("[dim]RSS figures are deltas over the process RSS before loading[/]")
        if "ratios" in gen:
            ra = gen["ratios"]
            console.print(
                f"quantized vs fp: {ra['speed_quant_over_fp']:.2f}x the tokens/s "
                f"({ra['slowdown_fp_over_quant']:.2f}x slower), "
                f"{ra['weight_bytes_quant_over_fp']:.3f}x the weight bytes",
                soft_wrap=True,
            )
        for note in gen["notes"]:
            console.print(f"[yellow]note[/]: {note}", soft_wrap=True)
    s = r["summary"]
    parts = [f"prefill time x {s['prefill_time_ratio_min']:.2f}-{s['prefill_time_ratio_max']:.2f}"
             if "prefill_time_ratio_max" in s else None,
             f"decode time x {s['decode_time_ratio_min']:.2f}-{s['decode_time_ratio_max']:.2f}",
             f"weight bytes x <= {s['memory_ratio_max']:.3f}"]
    console.print("summary: " + ", ".join(x for x in parts if x), soft_wrap=True)
