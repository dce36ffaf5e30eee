"""Text generation with a KV cache: the library side of ``eqat generate``.

:func:`load_generator` loads any model ``eqat eval`` loads (native, GPTQ v1/v2, GGUF, full
precision, the ``smollm2`` alias) through :func:`eqat_cli.models.resolve`, so packed layers run
the kernel the registry selects. :meth:`Generator.generate` prefills the prompt in one forward,
then decodes one token per forward with the model's KV cache (transformers' cache returned as
``cache``, ``past_key_values`` before 5.2x), until an end-of-sequence token or ``max_new_tokens``; prefill and decode are
timed separately. Text is streamed through a callback as soon as it decodes to whole characters
(:class:`TextStream`); nothing here prints. :func:`chat_session` runs a multi-turn chat whose
history goes through the tokenizer's chat template on every turn.

Sampling (:func:`pick_token`): repetition penalty over the context, then temperature (0 = greedy
argmax, deterministic), top-k, top-p, and a draw from a seeded ``torch.Generator`` (the same seed
repeats exactly).

Torch is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from eqat_cli.errors import BadInputError
from eqat_cli.memory import peak_rss_bytes
from eqat_cli.models import resolve
from eqat_cli.progress import Progress, count, no_progress

TextCallback = Callable[[str], None]
DECODERS = ("auto", "int8", "fp32", "hf")
SESSION_EXIT = ("/exit", "/quit", "/bye")
SESSION_RESET = "/reset"


# ---------------------------------------------------------------------- options


@dataclass
class SamplingConfig:
    """How the next token is chosen. ``temperature=0`` is greedy (top-k/top-p/seed unused)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the context
    seed: Optional[int] = None  # None: a random seed, reported in the result
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def validate(self) -> "SamplingConfig":
        def finite(name: str, v: float) -> None:
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadInputError(f"{name} must be a finite number, got {v!r}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            finite(name, getattr(self, name))
        if self.temperature < 0:
            raise BadInputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise BadInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise BadInputError(f"top_k must be >= 0, got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise BadInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise BadInputError(f"seed must be in [0, 2**32), got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------------- results


@dataclass
class Generation:
    """One generation: the text and ids produced (the stop token excluded) and its speed."""

    text: str
    token_ids: list[int]
    prompt: str  # the text the model was given (after the chat template, if any)
    prompt_tokens: int
    stop: str  # "eos" (an end-of-sequence token came) or "length" (max_new_tokens reached)
    prefill_s: float  # the prompt's forward and the first token's choice
    decode_s: float  # the one-token forwards and choices after it
    decode_steps: int  # one-token forwards
    seed: Optional[int]
    peak_rss_bytes: int  # the process's peak resident memory so far
    stop_token_id: Optional[int] = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        if self.decode_steps == 0 or self.decode_s <= 0:
            return None
        return self.decode_steps / self.decode_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(new_tokens=self.new_tokens, prefill_tokens_per_s=self.prefill_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d


# ---------------------------------------------------------------------- streaming text


class TextStream:
    """Turns generated token ids into text pieces as soon as they decode to whole characters.

    Each new id decodes a short window ``ids[prefix:]`` and emits what it adds beyond
    ``ids[prefix:read]``: a piece ending in U+FFFD (an incomplete UTF-8 sequence of byte tokens)
    waits for the next id, and a word's leading space, which SentencePiece-style decoders drop at
    the start of a text, is kept because the window starts one emitted piece earlier. The
    concatenated pieces equal ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # ids before this are emitted
        self.emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            piece = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted.append(piece)
            return piece
        return ""

    def flush(self) -> str:
        """What is left (an incomplete character at the end is emitted as it decodes)."""
        full = self._decode(self.ids)
        done = "".join(self.emitted)
        piece = full[len(done):] if full.startswith(done) else ""
        if piece:
            self.emitted.append(piece)
        self.read = self.prefix = len(self.ids)
        return piece

    @property
    def text(self) -> str:
        return "".join(self.emitted)


# ---------------------------------------------------------------------- sampling


def pick_token(logits: Any, context: Any, cfg: SamplingConfig, rng: Any = None) -> int:
    """The next token id from the last position's ``logits`` (1-D, float32, CPU).

    ``context`` (1-D int64 tensor) holds the ids the repetition penalty applies to (the prompt
    and what was generated): a positive logit is divided by the penalty, a negative one
    multiplied. Greedy when ``cfg.temperature == 0``; else logits / temperature, keep the
    ``top_k`` best, keep the smallest set whose probability reaches ``top_p`` (the best token
    always stays), draw from ``rng``.
    """
    import torch

    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and context is not None and context.numel():
        logits = logits.clone()
        idx = torch.unique(context)
        idx = idx[(idx >= 0) & (idx < logits.numel())]
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
    if cfg.greedy:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
        drop = before >= cfg.top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng))


def make_rng(seed: Optional[int]) -> tuple[Any, int]:
    """A CPU ``torch.Generator`` seeded with ``seed`` (a random seed when None) and that seed."""
    import torch

    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    return torch.Generator(device="cpu").manual_seed(int(seed)), int(seed)


# ---------------------------------------------------------------------- the generator


def context_length(config: Any) -> Optional[int]:
    """The model's context (``max_position_embeddings``, of the text model for multimodal ones)."""
    for cfg in (config, getattr(config, "text_config", None)):
        n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id: the generation config's (one or a list) and the tokenizer's."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    return ids


@dataclass
class Generator:
    """A loaded model ready to generate: model, tokenizer, stop ids, context, how it was loaded."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]
    context: Optional[int]
    info: dict = field(default_factory=dict)  # model, format, quant, backend, device, dtype, threads
    decoder: Any = None  # eqat_cli.decode.Decoder (compact step, static KV cache) or None: transformers' forward

    # -- prompts ------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def require_chat_template(self) -> None:
        if not self.has_chat_template:
            raise BadInputError(
                f"{self.info.get('model', 'the model')}: the tokenizer has no chat template",
                hint="drop --chat/--system/--interactive and pass the raw prompt",
            )

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template applied to ``messages``, ending with the assistant's turn opening."""
        self.require_chat_template()
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors: the template refuses these messages
            raise BadInputError(f"the chat template refused the messages ({str(e).splitlines()[0]})") from e
        return text

    def encode(self, prompt: str, chat: bool = False, system: Optional[str] = None) -> tuple[list[int], str]:
        """Ids and text of one prompt: raw (the tokenizer adds its BOS, if it does), or as one user
        message through the chat template (with a system message first if ``system``)."""
        if not prompt or not prompt.strip():
            raise BadInputError("the prompt is empty", hint="pass --prompt TEXT or pipe text on stdin")
        if chat or system:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return self.encode_messages(messages)
        ids = list(self.tokenizer(prompt)["input_ids"])
        return ids, prompt

    def encode_messages(self, messages: list[dict]) -> tuple[list[int], str]:
        text = self.render_chat(messages)
        # The template writes the special tokens (BOS included) as text: do not add them again.
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, text

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens == 0:
            raise BadInputError("the prompt encodes to no tokens", hint="pass a non-empty prompt")
        if self.context is not None and prompt_tokens + max_new_tokens > self.context:
            raise BadInputError(
                f"the prompt is {prompt_tokens} tokens; with --max-new-tokens {max_new_tokens} that is "
                f"more than the model's context of {self.context} tokens",
                hint="shorten the prompt (or /reset the chat) or lower --max-new-tokens",
            )

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        ids: list[int],
        cfg: SamplingConfig,
        on_text: Optional[TextCallback] = None,
        prompt_text: str = "",
        rng: Any = None,
    ) -> Generation:
        """Generate after ``ids``; stream text pieces to ``on_text``. ``rng`` (a seeded
        ``torch.Generator``) continues a session's draws; by default one is seeded from
        ``cfg.seed``."""
        import torch

        cfg.validate()
        self.check_fits(len(ids), cfg.max_new_tokens)
        seed = None
        if not cfg.greedy and rng is None:
            rng, seed = make_rng(cfg.seed)
        elif not cfg.greedy:
            seed = cfg.seed
        model = self.model
        device = next(model.parameters()).device
        stream = TextStream(self.tokenizer)
        emit = on_text or (lambda s: None)
        eos = set() if cfg.ignore_eos else set(self.eos_ids)
        context = torch.tensor(ids, dtype=torch.long)
        generated: list[int] = []
        stop, stop_id = "length", None
        keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"  # transformers >= 5.2x

        dec = self.decoder
        if dec is not None:
            dec.reset(len(ids) + cfg.max_new_tokens)

        def step(tokens: list[int], first: bool):
            nonlocal cache
            if dec is not None:
                return dec.forward(tokens)
            if first:
                out = model(input_ids=torch.tensor([tokens], device=device), use_cache=True, **keep)
            else:
                out = model(input_ids=torch.tensor([tokens], device=device), use_cache=True, **{cache_kw: cache})
            cache = _cache_of(out)
            return out.logits[0, -1]

        cache = None
        with torch.inference_mode():
            t0 = time.perf_counter()
            tok = pick_token(step(ids, True).float().cpu(), context, cfg, rng)
            prefill_s = time.perf_counter() - t0
            decode_s, steps = 0.0, 0
            while True:
                if tok in eos:
                    stop, stop_id = "eos", tok
                    break
                generated.append(tok)
                piece = stream.push(tok)
                if piece:
                    emit(piece)
                if len(generated) >= cfg.max_new_tokens:
                    break
                if cfg.repetition_penalty != 1.0:
                    context = torch.cat([context, torch.tensor([tok], dtype=torch.long)])
                t0 = time.perf_counter()
                tok = pick_token(step([tok], False).float().cpu(), context, cfg, rng)
                decode_s += time.perf_counter() - t0
                steps += 1
            cache = None
        rest = stream.flush()
        if rest:
            emit(rest)
        return Generation(
            text=stream.text, token_ids=generated, prompt=prompt_text, prompt_tokens=len(ids), stop=stop,
            prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps, seed=seed,
            peak_rss_bytes=peak_rss_bytes(), stop_token_id=stop_id,
        )

    def generate_text(
        self,
        prompt: str,
        cfg: SamplingConfig,
        on_text: Optional[TextCallback] = None,
        chat: bool = False,
        system: Optional[str] = None,
    ) -> Generation:
        """Encode ``prompt`` (raw or through the chat template) and generate after it."""
        ids, text = self.prepare(prompt, cfg, chat=chat, system=system)
        return self.generate(ids, cfg, on_text, prompt_text=text)

    def prepare(self, prompt: str, cfg: SamplingConfig, chat: bool = False,
                system: Optional[str] = None) -> tuple[list[int], str]:
        """Encode and check a prompt (empty, longer than the context) without generating."""
        cfg.validate()
        ids, text = self.encode(prompt, chat=chat, system=system)
        self.check_fits(len(ids), cfg.max_new_tokens)
        return ids, text


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` in newer transformers, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------- loading


def load_generator(
    spec: str,
    device: str = "auto",
    backend: str = "auto",
    threads: Optional[int] = None,
    progress: Optional[Progress] = None,
    head_bits: Optional[int] = None,
    decoder: str = "auto",
) -> Generator:
    """Load ``spec`` like ``eqat eval`` does (every format, architectures no plugin describes
    included) with the registry's backend for packed layers; ``head_bits`` (8 or 4) also
    quantizes the token embedding and lm_head. ``decoder`` (:data:`DECODERS`): ``int8`` and
    ``fp32`` run :class:`eqat_cli.decode.Decoder` (a compact step with a static KV cache; packed
    layers with int8 activations at one-token steps, or the backend's fp32 kernels) where it
    describes the model, transformers' forward otherwise; ``hf`` always transformers' forward;
    ``auto`` is ``fp32`` (greedy tokens equal to transformers' forward; ``int8`` is about 1.6-2x
    faster at decode on SmolLM2 but its rounding changes greedy tokens within a few steps).
    Progress: ``load`` 0/1, then 1/1."""
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    count(progress, "load", spec, 0, 1)
    lm = resolve(spec, device=device, backend=backend, require_arch=False, head_bits=head_bits)
    count(progress, "load", spec, 1, 1)
    tok = lm.tokenizer
    if tok is None or not callable(getattr(tok, "decode", None)):
        raise BadInputError(f"{spec}: the model has no tokenizer",
                            hint="copy the tokenizer files of its source model into the directory")
    first = next(lm.model.parameters())
    info = {
        "model": spec,
        "format": lm.format,
        "quant": {k: v for k, v in lm.quant.items() if k != "backend"},
        "backend": lm.quant.get("backend") or "none: full-precision model (plain torch layers)",
        "device": str(first.device),
        "dtype": str(first.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "model_type": lm.model.config.model_type,
    }
    dec = None
    if decoder not in DECODERS:
        raise BadInputError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder != "hf":
        from eqat_cli.decode import build_decoder, supported

        why = supported(lm.model)
        dec = build_decoder(lm.model, "int8" if decoder == "int8" else "fp32") if why is None else None
        info["decoder"] = (f"compact step, static KV cache, {'int8' if dec.int8 else 'fp32'} activations "
                           f"at one-token steps" if dec is not None else f"transformers' forward ({why})")
    else:
        info["decoder"] = "transformers' forward (requested)"
    return Generator(lm.model, tok, eos_token_ids(lm.model, tok), context_length(lm.model.config), info,
                     decoder=dec)


# ---------------------------------------------------------------------- chat session


def chat_session(
    gen: Generator,
    cfg: SamplingConfig,
    read_line: Callable[[], Optional[str]],
    on_text: Optional[TextCallback] = None,
    on_event: Optional[Callable[[str, dict], None]] = None,
    system: Optional[str] = None,
) -> dict:
    """A multi-turn chat: each line ``read_line`` returns is a user message; the whole history
    (system message, every user message and reply) goes through the chat template each turn.

    Ends at end of input (``read_line`` returns None), an empty line or ``/exit``; ``/reset``
    clears the history (the system message stays). ``on_event(event, info)`` gets ``turn`` after
    each reply (``info``: the :class:`Generation` as a dict, plus ``turn``) and ``reset``. One
    random generator seeded once serves every turn, so a seeded session repeats. Returns
    ``{"seed", "turns": [...], "messages": [...]}``.
    """
    cfg.validate()
    gen.require_chat_template()
    rng, seed = (None, None) if cfg.greedy else make_rng(cfg.seed)
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    turns: list[dict] = []
    notify = on_event or (lambda e, i: None)
    while True:
        line = read_line()
        if line is None:
            break
        text = line.strip()
        if not text or text.lower() in SESSION_EXIT:
            break
        if text.lower() == SESSION_RESET:
            messages = list(base)
            notify("reset", {"turn": len(turns)})
            continue
        ids, prompt = gen.encode_messages(messages + [{"role": "user", "content": text}])
        result = gen.generate(ids, cfg, on_text, prompt_text=prompt, rng=rng)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
        info = {**result.to_dict(), "seed": seed, "turn": len(turns) + 1}
        turns.append(info)
        notify("turn", info)
    return {"seed": seed, "turns": turns, "messages": messages}


# ---------------------------------------------------------------------- the command


def generate_from_spec(
    spec: str,
    cfg: SamplingConfig,
    prompt: Optional[str] = None,
    *,
    chat: bool = False,
    system: Optional[str] = None,
    session: bool = False,
    read_line: Optional[Callable[[], Optional[str]]] = None,
    on_text: Optional[TextCallback] = None,
    progress: Progress = no_progress,
    device: str = "auto",
    backend: str = "auto",
    threads: Optional[int] = None,
    head_bits: Optional[int] = None,
    decoder: str = "auto",
) -> dict:
    """``eqat generate``'s library entry: check the options, load ``spec``
    (:func:`load_generator`), then answer ``prompt`` once, or with ``session`` run a multi-turn
    chat over the lines ``read_line`` returns (:func:`chat_session`). Text streams through
    ``on_text``.

    Refused before the model loads: a ``prompt`` with ``session`` (a session reads its messages
    from ``read_line``), an empty prompt. Progress: ``load`` 0/1 and 1/1; ``ready`` (``info``: the
    model's description, once loaded and every refusal of the prompt done, before the first
    token); per session turn ``turn`` (the turn's :class:`Generation` as a dict) and ``reset``.
    Returns the model's description, ``sampling`` (the config) and the generation (one prompt:
    the :class:`Generation` as a dict and ``chat``; a session: ``chat``, ``interactive``,
    ``seed``, ``turns`` and ``messages``).
    """
    cfg.validate()
    if session and prompt is not None:
        raise BadInputError("--interactive reads the messages from stdin; drop --prompt")
    if session and read_line is None:
        raise BadInputError("a chat session needs a source of user messages")
    if not session and (prompt is None or not prompt.strip()):
        raise BadInputError("the prompt is empty", hint="pass --prompt TEXT or pipe text on stdin")
    gen = load_generator(spec, device=device, backend=backend, threads=threads, progress=progress,
                         head_bits=head_bits, decoder=decoder)
    if session:
        gen.require_chat_template()
        progress("ready", dict(gen.info))
        out = chat_session(gen, cfg, read_line, on_text, progress, system=system)
        out = {"chat": True, "interactive": True, **{k: v for k, v in out.items() if k != "messages"},
               "messages": out["messages"]}
    else:
        ids, text = gen.prepare(prompt, cfg, chat=chat, system=system)  # refusals before any output
        progress("ready", dict(gen.info))
        res = gen.generate(ids, cfg, on_text, prompt_text=text)
        out = {**res.to_dict(), "chat": bool(chat or system)}
    return {**gen.info, "sampling": asdict(cfg), **out}
