"""``eqat generate``: talk to a model: one prompt, or an interactive chat; text streams to stdout."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from eqat_cli.cli.common import (
    AT_LEAST_1, NON_NEGATIVE, POSITIVE, BackendOpt, DeviceOpt, JsonOpt, ModelArg, Range,
    QuantizeHeadOpt, TrustRemoteCodeOpt, console, emit_json,
)


def generate_cmd(
    model: ModelArg,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt (default: read from stdin; an interactive chat when stdin is a terminal).", show_default=False)] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt through the tokenizer's chat template as a user message.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System message (implies --chat).", show_default=False)] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Multi-turn chat: one user message per line of stdin, history kept; an empty line, /exit or end of input ends it, /reset clears the history.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many new tokens (or at an end-of-sequence token)."), AT_LEAST_1] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy (deterministic)."), NON_NEGATIVE] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this."), Range(gt=0, le=1)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep only the k most likely tokens (0 = all)."), NON_NEGATIVE] = 0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="Divide the logits of tokens already in the context by this (1 = off)."), POSITIVE] = 1.0,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at end-of-sequence tokens: generate exactly --max-new-tokens (for benchmarks).")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the sampling (default: random, reported in --json); the same seed repeats exactly.", show_default=False), Range(ge=0, lt=2**32)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads (default: torch's choice).", show_default=False), AT_LEAST_1] = None,
    backend: BackendOpt = "auto",
    device: DeviceOpt = "auto",
    quantize_head: QuantizeHeadOpt = None,
    decoder: Annotated[str, typer.Option("--decoder", help="How one-token steps run: int8 (a compact step with a static KV cache; packed layers multiply int8-rounded activations, as llama.cpp), fp32 (the compact step on the backend's exact fp32 kernels), hf (transformers' forward); auto = fp32 (greedy tokens equal to hf's; int8 is faster but its rounding changes greedy tokens). Models the compact step does not describe use transformers' forward.")] = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = None,
):
    """Generate text with any model `eqat eval` loads (native, GPTQ v1/v2, GGUF, full
    precision, alias 'smollm2'), with a KV cache, stopping at an end-of-sequence token or
    --max-new-tokens. Packed layers run the backend `eqat plugins` ranks first (or --backend).
    Text streams to stdout as it comes; prefill and decode tokens/s and peak RSS go to stderr
    at the end (and to --json, with the text and token ids; with `--json -` the text is not
    streamed).

    Example: [bold]eqat generate smollm2 --chat -p "What is the capital of France?"[/]

    Example: [bold]eqat generate out/w2g64-gptq -p "Once upon a time" -n 64 -t 0.8 --top-p 0.95 --seed 1[/]

    Example: [bold]eqat generate smollm2 -i --system "You answer in one sentence."[/]
    """
    import transformers

    from eqat_cli.generate import SamplingConfig, generate_from_spec

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         repetition_penalty=repetition_penalty, seed=seed,
                         ignore_eos=ignore_eos).validate()
    tty = _stdin_is_tty()
    session = interactive or (prompt is None and tty)
    if not session and prompt is None:
        prompt = sys.stdin.read()
    stream_text = not (json_out is not None and str(json_out) == "-")
    transformers.utils.logging.disable_progress_bar()
    status = console.status(f"loading {model}")

    def progress(event: str, info: dict) -> None:
        if event == "load":
            status.stop() if info["done"] else status.start()
        elif event == "ready":
            console.print(f"[dim]{_describe(info)}[/]", soft_wrap=True)
            if session:
                console.print("[dim]chat: one message per line; /reset clears the history, an empty line or "
                              "/exit ends[/]")
        elif event == "turn":
            if stream_text:
                _write("\n")
            _stats(info)
        elif event == "reset":
            console.print("[dim]history cleared[/]")

    try:
        out = generate_from_spec(model, cfg, prompt, chat=chat, system=system, session=session,
                                 read_line=_line_reader(tty) if session else None, on_text=_writer(stream_text),
                                 progress=progress, device=device, backend=backend, threads=threads,
                                 head_bits=quantize_head, decoder=decoder)
    finally:
        status.stop()
    if not session:
        if stream_text:
            _write("\n")
        _stats(out)
    emit_json(out, json_out)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _writer(enabled: bool):
    return _write if enabled else None


def _line_reader(tty: bool):
    """The chat's user messages: ``input()`` on a terminal, else one line of stdin per message."""

    def read_line() -> Optional[str]:
        if tty:
            try:
                return input("> ")
            except EOFError:
                return None
        console.print("> ", end="")
        line = sys.stdin.readline()
        return None if line == "" else line

    return read_line


def _describe(info: dict) -> str:
    q = info.get("quant") or {}
    what = f"w{q.get('bits')}g{q.get('group_size')} {info['format']}" if q else f"{info['format']} {info['dtype']}"
    dec = f" · {info['decoder']}" if info.get("decoder") else ""
    return f"{info['model']}: {what} · {info['device']} · {info['threads']} threads · {info['backend']}{dec}"


def _stats(r: dict) -> None:
    dec = r.get("decode_tokens_per_s")
    parts = [
        f"prompt {r['prompt_tokens']} tokens, {r['prefill_tokens_per_s']:.1f} tok/s",
        f"generated {r['new_tokens']} tokens" + (f", {dec:.1f} tok/s" if dec is not None else ""),
        f"stop: {r['stop']}",
        f"peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB",
    ]
    if r.get("seed") is not None:
        parts.append(f"seed {r['seed']}")
    console.print(f"[dim]{' · '.join(parts)}[/]", soft_wrap=True)

