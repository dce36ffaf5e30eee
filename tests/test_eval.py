"""`eqat eval`: perplexity (GPTQ protocol), data loading, zero-shot tasks through lm-eval, CLI.

Everything runs offline on tiny models and synthetic data files written to tmp_path with the
same relative layout as the real data dir; one integration test uses the real SmolLM2 and the
real data (skipped when either is absent).
"""

from __future__ import annotations

import shutil
import bz2
import json
import math
import os

import pytest
import torch

from conftest import build, tiny_llama_config

from eqat_cli.scheme import QuantScheme

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 320
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: How do I open a jar?\nAnswer: Twist the lid counterclockwise.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Sunlight is the source of energy for nearly all ecosystems.",
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .",
    "Which piece of safety equipment keeps mold spores out of the lungs? A breathing mask.",
]


# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from threads, and on a busy shared 2-core box
    OpenMP threads slowed small matmuls ~400x and a SmolLM2 forward 3-5x (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained in memory (no network), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    assert len(fast) <= VOCAB
    return fast


@pytest.fixture(scope="module")
def model():
    # A larger init spread than the default makes log-likelihoods differ clearly between choices.
    return build(tiny_llama_config(vocab_size=VOCAB, initializer_range=0.1), seed=1)


def wiki_text(n_sections: int = 6) -> str:
    """Synthetic text in the exact wiki.test.raw form: ' = T = \\n' headings, ' \\n' blank lines."""
    parts = [" \n"]
    for i in range(n_sections):
        parts += [f" = Section {i} = \n", " \n"]
        parts += [f" The quick brown fox {i} jumps over the lazy dog . It was {i} years old . \n", " \n"]
    return "".join(parts)


PIQA = [
    {"goal": "How do I open a jar?", "sol1": "Twist the lid counterclockwise.", "sol2": "Hit the jar with a hammer.", "label": 0},
    {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ", "label": 1},
    {"goal": "Keep a dog calm", "sol1": "Pet the dog slowly.", "sol2": "Shout at the dog.", "label": 0},
    {"goal": "Dry wet shoes", "sol1": "Put them in the oven at 500 degrees.", "sol2": "Stuff them with newspaper.", "label": 1},
    {"goal": "Cool a drink fast", "sol1": "Wrap it in a wet towel in the freezer.", "sol2": "Leave it in the sun.", "label": 0},
    {"goal": "Light a room", "sol1": "Close the curtains.", "sol2": "Open the curtains.", "label": 1},
]


def arc_item(i, stem, texts, labels, key):
    return {"id": f"T_{i}", "question": {"stem": stem, "choices": [
        {"text": t, "label": l} for t, l in zip(texts, labels)]}, "answerKey": key}


ARC = [
    arc_item(0, "Which is the source of energy for most ecosystems?", ["Sunlight", "Soil", "Wind", "Rocks"], "ABCD", "A"),
    arc_item(1, "Which keeps mold spores out of the lungs?", ["goggles", "breathing mask", "gloves", "apron"], "ABCD", "B"),
    arc_item(2, "What do plants need to make food?", ["sand", "light", "salt"], "ABC", "B"),
    arc_item(3, "Which is a mammal?", ["shark", "frog", "whale", "trout"], ["1", "2", "3", "4"], "3"),
    arc_item(4, "Which melts ice fastest?", ["salt", "sugar", "sand", "air"], ["1", "2", "3", "4"], "1"),
    arc_item(5, "What is the boiling point of water at sea level?", ["50 C", "75 C", "90 C", "100 C", "120 C"], "ABCDE", "D"),
]

# 6 lines per item: context, gold label, 4 endings. The third item carries WikiHow artefacts
# that lm-eval's clean-up removes (expected cleaned strings are written out by hand below).
HELLASWAG_LINES = [
    "Roof shingle removal: A man is sitting on a roof. he", "3",
    "is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
    "is holding a rubik's cube.", "starts pulling up roofing on a roof.",
    "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady", "3",
    "swings and lands in her arms.", "pulls the barbell forward.",
    "pulls a rope attached to the barbell.", "stands and lifts the weight over her head.",
    "Family Life: How to entertain a toddler. Visit a site like [www.kiddio.org] to find  games.", "0",
    "Choose small, simple games.", "Run away [title] from it.", "Sleep all day.", "Eat the games.",
    "Canoeing: Two women in a canoe paddle down a river. they", "1",
    "sink to the bottom.", "paddle around a bend in the river.", "fly into the air.", "turn into fish.",
]
HELLASWAG_EXPECTED = [
    ("Roof shingle removal: A man is sitting on a roof. he",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
      "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady",
     ["swings and lands in her arms.", "pulls the barbell forward.",
      "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."], 3),
    ("Family Life: How to entertain a toddler. Visit a site like to find games.",
     ["Choose small, simple games.", "Run away. from it.", "Sleep all day.", "Eat the games."], 0),
    ("Canoeing: Two women in a canoe paddle down a river. they",
     ["sink to the bottom.", "paddle around a bend in the river.", "fly into the air.", "turn into fish."], 1),
]


@pytest.fixture
def fake_data_dir(tmp_path):
    """The real data dir's layout, filled with small synthetic files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    (d / "wikitext-2-raw").mkdir(parents=True)
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text(wiki_text(), encoding="utf-8")
    (d / "piqa").mkdir()
    (d / "piqa" / "piqa_validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in PIQA))
    (d / "arc_easy").mkdir()
    (d / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ARC))
    (d / "arc_easy" / "ARC-Easy-Dev.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ARC[:2]))
    (d / "hellaswag").mkdir()
    (d / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(
        bz2.compress(("\n".join(HELLASWAG_LINES) + "\n").encode())
    )
    (d / "c4").mkdir()
    docs = [f"doc {i} the quick brown fox ." for i in range(1105)]
    pq.write_table(pa.table({"text": docs, "url": ["u"] * len(docs)}), d / "c4" / "c4_validation_2k.parquet")
    return d


def reference_ppl(model, ids: list[int], seqlen: int, limit=None) -> float:
    """Independent reference: HF's own full-sequence loss per window, averaged, exponentiated."""
    n = len(ids) // seqlen
    if limit:
        n = min(n, limit)
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor([ids[i * seqlen:(i + 1) * seqlen]])
            losses.append(model(input_ids=w, labels=w).loss.item())
    return math.exp(sum(losses) / n)


# ---------------------------------------------------------------------- (1) perplexity


def test_perplexity_matches_direct_computation(model, tokenizer, fake_data_dir):
    from eqat_cli.eval.ppl_text import perplexity_text
    from eqat_cli.eval.perplexity import perplexity

    corpus = perplexity_text("wikitext2", fake_data_dir)
    ids = tokenizer(corpus.text).input_ids
    seqlen = 32
    assert len(ids) // seqlen >= 4
    res = perplexity(model, tokenizer, corpus, seqlen=seqlen)
    assert res.windows == res.windows_available == len(ids) // seqlen
    assert res.tokens == len(ids)
    assert res.ppl == pytest.approx(reference_ppl(model, ids, seqlen), rel=1e-5)
    assert res.nll == pytest.approx(math.log(res.ppl))
    # --limit takes the first windows; batching does not change the numbers.
    events = []
    lim = perplexity(model, tokenizer, corpus, seqlen=seqlen, limit=3, batch_size=2,
                     progress=lambda event, info: events.append((event, info)))
    assert lim.windows == 3
    # Progress in the library's one form: ("ppl", {label, done, total}) per batch.
    assert events == [("ppl", {"label": "wikitext2", "done": d, "total": 3}) for d in (0, 2, 3)]
    assert lim.ppl == pytest.approx(reference_ppl(model, ids, seqlen, limit=3), rel=1e-5)


def test_perplexity_c4_protocol_truncates_to_256_windows(model, tokenizer, fake_data_dir):
    from eqat_cli.eval.ppl_text import perplexity_text
    from eqat_cli.eval.perplexity import perplexity

    corpus = perplexity_text("c4", fake_data_dir)
    # first 1100 documents joined with ' '
    assert corpus.text == " ".join(f"doc {i} the quick brown fox ." for i in range(1100))
    assert corpus.max_windows == 256 and not corpus.comparable and "NOT comparable" in corpus.note
    seqlen = 4
    res = perplexity(model, tokenizer, corpus, seqlen=seqlen, limit=2)
    assert res.tokens == 256 * seqlen and res.windows_available == 256 and res.windows == 2
    ids = tokenizer(corpus.text).input_ids[: 256 * seqlen]
    assert res.ppl == pytest.approx(reference_ppl(model, ids, seqlen, limit=2), rel=1e-5)


def test_perplexity_rejects_bad_settings(model, tokenizer, fake_data_dir):
    from eqat_cli.eval.ppl_text import PplCorpus
    from eqat_cli.errors import BadInputError
    from eqat_cli.eval.perplexity import perplexity

    short = PplCorpus("x", "tiny", "test", "test")
    with pytest.raises(BadInputError, match="fewer than one window"):
        perplexity(model, tokenizer, short, seqlen=64)
    with pytest.raises(BadInputError, match="max_position_embeddings"):
        perplexity(model, tokenizer, short, seqlen=100_000)


# ---------------------------------------------------------------------- (2) data protocol


def test_wikitext_rows_follow_the_gptq_hf_protocol(tmp_path):
    from eqat_cli.data import read_corpus
    from eqat_cli.eval.ppl_text import perplexity_text

    d = tmp_path / "d"
    (d / "wikitext-2-raw").mkdir(parents=True)
    raw = " \n = Robert Boulter = \n \n Robert Boulter is an actor . \n \n = = Career = = \n \n"
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text(raw, encoding="utf-8")
    rows = read_corpus("wikitext2", "test", d)
    # blank lines (" \n") become "" rows; content rows keep their "\n" (= HF wikitext rows)
    assert rows == [
        "", " = Robert Boulter = \n", "", " Robert Boulter is an actor . \n", "",
        " = = Career = = \n", "",
    ]
    corpus = perplexity_text("wikitext2", d)
    assert corpus.text == (
        "\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an actor . \n\n\n\n\n"
        " = = Career = = \n\n\n"
    )
    assert corpus.comparable and corpus.source.startswith("local:")


def test_read_corpus_files_and_named_sets(tmp_path, fake_data_dir):
    from eqat_cli.data import read_corpus

    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert read_corpus(str(txt), "train", None) == ["first doc\nline two", "second doc"]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert read_corpus(str(jl), "train", None) == ["one", "two"]
    docs = read_corpus("c4", "validation", fake_data_dir)
    assert len(docs) == 1105 and docs[0] == "doc 0 the quick brown fox ."
    assert read_corpus("c4", "train", fake_data_dir) == docs  # locally the same slice
    assert read_corpus(str(fake_data_dir / "c4" / "c4_validation_2k.parquet")) == docs


def test_data_errors_are_one_line_and_name_the_expected_file(tmp_path, fake_data_dir):
    from eqat_cli.data import read_corpus
    from eqat_cli.eval.ppl_text import check_ppl_set
    from eqat_cli.errors import EqatError

    cases = [
        (("nope", "test", fake_data_dir), "unknown data set 'nope'"),
        (("wikitext2", "train", fake_data_dir), str(fake_data_dir / "wikitext-2-raw" / "wiki.train.raw")),
        (("redpajama", "train", fake_data_dir), "no local copy"),
        (("piqa", "validation", fake_data_dir), "zero-shot task"),
        ((str(tmp_path / "missing.jsonl"), "train", None), "data file not found"),
    ]
    for args, needle in cases:
        with pytest.raises(EqatError) as ei:
            read_corpus(*args)
        assert needle in str(ei.value) and "\n" not in str(ei.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(EqatError, match="no 'text' field"):
        read_corpus(str(bad))
    with pytest.raises(EqatError, match="no perplexity protocol"):
        check_ppl_set("redpajama", None)
    (fake_data_dir / "c4" / "c4_validation_2k.parquet").unlink()
    with pytest.raises(EqatError, match="expected file .*c4_validation_2k.parquet"):
        check_ppl_set("c4", fake_data_dir)


def test_hub_loading_uses_the_registered_ids(monkeypatch):
    """Without a data dir, named sets go to datasets.load_dataset with the GPTQ arguments."""
    import datasets

    from eqat_cli.eval.ppl_text import perplexity_text

    calls = []

    def fake_load(path, name=None, **kw):
        calls.append((path, name, kw))
        texts = ["a", "", "b"] if "wikitext" in path else [f"d{i}" for i in range(1200)]
        return datasets.Dataset.from_dict({"text": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    wt = perplexity_text("wikitext2", None)
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", {"split": "test"})
    assert wt.text == "a\n\n\n\nb" and wt.source.startswith("hub:Salesforce/wikitext")
    c4 = perplexity_text("c4", None)
    assert calls[-1][0] == "allenai/c4"
    assert list(calls[-1][2]["data_files"].values()) == ["en/c4-validation.00000-of-00008.json.gz"]
    assert c4.text == " ".join(f"d{i}" for i in range(1100)) and c4.comparable

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    from eqat_cli.errors import EqatError

    with pytest.raises(EqatError, match="cannot load 'wikitext2' from the Hugging Face Hub") as ei:
        perplexity_text("wikitext2", None)
    assert "--data-dir" in ei.value.hint


# ---------------------------------------------------------------------- (3) zero-shot


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), straight from the model's logits."""
    ctx = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def expected_items(task: str):
    """(context, [choices], gold) per item, written from lm-eval's task definitions."""
    if task == "piqa":
        return [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in PIQA]
    if task == "arc_easy":
        return [
            (f"Question: {d['question']['stem']}\nAnswer:",
             [c["text"] for c in d["question"]["choices"]],
             [c["label"] for c in d["question"]["choices"]].index(d["answerKey"]))
            for d in ARC
        ]
    return HELLASWAG_EXPECTED


def independent_scores(model, tokenizer, items):
    lls, acc, acc_norm = [], 0, 0
    for ctx, choices, gold in items:
        ll = [direct_loglikelihood(model, tokenizer, ctx, " " + c) for c in choices]
        norm = [v / len(c) for v, c in zip(ll, choices)]
        acc += max(range(len(ll)), key=ll.__getitem__) == gold
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == gold
        lls.append(ll)
    return lls, acc / len(items), acc_norm / len(items)


def test_local_tasks_score_like_an_independent_scorer(model, tokenizer, fake_data_dir):
    from eqat_cli.eval.zeroshot import plan_tasks, zeroshot

    plans = plan_tasks(["piqa", "arc_easy", "hellaswag"], fake_data_dir)
    seen = []
    results = zeroshot(model, tokenizer, plans, fake_data_dir, batch_size=2, log_samples=True,
                       progress=lambda event, info: seen.append((info["label"], info["done"], info["total"])))
    by_key = {r.key: r for r in results}
    assert set(by_key) == {"piqa", "arc_easy", "hellaswag_local"}
    assert "llama.cpp" in by_key["hellaswag_local"].note
    for task, key in (("piqa", "piqa"), ("arc_easy", "arc_easy"), ("hellaswag", "hellaswag_local")):
        items = expected_items(task)
        r = by_key[key]
        assert r.n == r.n_total == len(items)
        lls, acc, acc_norm = independent_scores(model, tokenizer, items)
        samples = sorted(r.samples, key=lambda s: s["doc_id"])
        for s, (ctx, choices, _), ll in zip(samples, items, lls):
            assert [a[0] for a in s["arguments"]] == [ctx] * len(choices)
            assert [a[1] for a in s["arguments"]] == [" " + c for c in choices]
            assert [x[0] for x in s["filtered_resps"]] == pytest.approx(ll, abs=1e-4)
        assert r.acc == pytest.approx(acc) and r.acc_norm == pytest.approx(acc_norm)
        assert r.acc_stderr is not None and r.source.startswith("local:")
        last = [x for x in seen if x[0] == key][-1]
        assert last[1] == last[2] > 0  # each task's bar ends full
    # the test is only meaningful if the scores are not all alike
    assert len({r.acc for r in results} | {r.acc_norm for r in results}) > 1


def test_task_plans_reject_unknown_and_missing(fake_data_dir):
    from eqat_cli.errors import EqatError
    from eqat_cli.eval.zeroshot import plan_tasks

    with pytest.raises(EqatError, match="unknown task 'winogrande'.*local tasks are arc_easy, hellaswag, piqa"):
        plan_tasks(["winogrande"], fake_data_dir)
    (fake_data_dir / "arc_easy" / "ARC-Easy-Dev.jsonl").unlink()
    with pytest.raises(EqatError, match="expected file .*ARC-Easy-Dev.jsonl"):
        plan_tasks(["arc_easy"], fake_data_dir)
    plans = plan_tasks(["piqa", "hellaswag"], None)  # standard lm-eval tasks from the Hub
    assert [(p.lm_eval_task, p.local) for p in plans] == [("piqa", False), ("hellaswag", False)]
    assert (plans[0].include_path / "piqa.yaml").is_file()


def test_hub_task_failure_is_one_line(model, tokenizer, monkeypatch):
    """Without a data dir lm-eval's own task loads from the Hub; failure maps to EqatError."""
    import datasets

    from eqat_cli.errors import EqatError
    from eqat_cli.eval.zeroshot import plan_tasks, zeroshot

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EqatError, match="cannot load task 'piqa' from the Hugging Face Hub") as ei:
        zeroshot(model, tokenizer, plan_tasks(["piqa"], None), None, limit=2)
    assert "--data-dir" in ei.value.hint


# ---------------------------------------------------------------------- (4) CLI


def invoke(*args):
    from typer.testing import CliRunner

    from eqat_cli.cli.app import build_app

    return CliRunner().invoke(build_app(), list(args), env={"EQAT_DATA_DIR": ""})


@pytest.fixture
def fp_dir(tmp_path, model, tokenizer):
    d = tmp_path / "tiny-fp"
    model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


@pytest.fixture
def packed_dir(tmp_path, tokenizer):
    from eqat_cli.formats.native import save_native
    from eqat_cli.quantize import rtn_quantize_model
    from eqat_cli.registry import get_registry

    m = build(tiny_llama_config(vocab_size=VOCAB, initializer_range=0.1), seed=2)
    rtn_quantize_model(m, get_registry().architecture("llama"), QuantScheme(4, 32))
    d = tmp_path / "tiny-w4g32"
    d.mkdir()
    save_native(m, tokenizer, d, {"bits": 4, "group_size": 32, "method": "rtn (test)"})
    return d


def test_cli_eval_full_precision_json(fp_dir, fake_data_dir, model, tokenizer, tmp_path):
    out = tmp_path / "res.json"
    res = invoke("eval", str(fp_dir), "--ppl", "wikitext2", "--tasks", "piqa,hellaswag",
                 "--seqlen", "32", "--data-dir", str(fake_data_dir), "--json", str(out))
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["format"] == "fp" and r["quant"] == {} and "full-precision" in r["backend"]
    assert r["bits_per_weight"]["quantized"] is False and r["bits_per_weight"]["effective"] == 32
    assert r["size_on_disk_bytes"] > 0
    p = r["perplexity"]["wikitext2"]
    assert p["seqlen"] == 32 and p["windows"] >= 4 and p["comparable"] is True
    text = "\n\n".join(
        l if l.strip() else "" for l in (fake_data_dir / "wikitext-2-raw" / "wiki.test.raw")
        .read_text().splitlines(keepends=True)
    )
    ids = tokenizer(text).input_ids
    assert p["ppl"] == pytest.approx(reference_ppl(model, ids, 32), rel=1e-4)
    assert set(r["zeroshot"]) == {"piqa", "hellaswag_local"}
    assert r["zeroshot"]["piqa"]["n"] == 6 and 0 <= r["zeroshot"]["piqa"]["acc"] <= 1
    assert set(r["timing"]) >= {"load_s", "perplexity_s", "zeroshot_s", "total_s"}
    assert "Perplexity" in res.output and "Zero-shot" in res.output


def test_cli_eval_packed_model_reports_bits_and_backend(packed_dir, fake_data_dir):
    res = invoke("eval", str(packed_dir), "--ppl", "wikitext2", "--tasks", "arc_easy",
                 "--seqlen", "32", "--limit", "2", "--data-dir", str(fake_data_dir), "--json", "-")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["format"] == "eqat" and r["quant"]["bits"] == 4 and r["quant"]["group_size"] == 32
    assert r["backend"].startswith("cpu" if shutil.which("g++") else "torch")
    bpw = r["bits_per_weight"]
    # every layer has in_features divisible by 32: 4 + (16 + 4) / 32
    assert bpw["quantized"] and bpw["effective"] == pytest.approx(4.625)
    assert bpw["formula"] == pytest.approx(4.625) and bpw["storage"] > bpw["effective"]
    assert bpw["quantized_layers"] == 2 * 7
    assert r["perplexity"]["wikitext2"]["windows"] == 2 and math.isfinite(r["perplexity"]["wikitext2"]["ppl"])
    assert r["zeroshot"]["arc_easy"]["n"] == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--ppl", "wikitext3"], "unknown data set 'wikitext3'"),
        (["--tasks", "piqa,nosuchtask"], "unknown task 'nosuchtask'"),
        (["--ppl", "wikitext2", "--limit", "0"], "--limit must be >= 1"),
        ([], "nothing to evaluate"),
    ],
)
def test_cli_eval_bad_inputs_exit_2_one_line(fp_dir, fake_data_dir, args, needle):
    res = invoke("eval", str(fp_dir), "--data-dir", str(fake_data_dir), *args)
    assert res.exit_code == 2, res.output
    errors = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in res.output


def test_cli_eval_missing_model_and_missing_local_file(tmp_path, fake_data_dir, fp_dir):
    res = invoke("eval", str(tmp_path / "no-such-model"), "--ppl", "wikitext2",
                 "--data-dir", str(fake_data_dir))
    assert res.exit_code == 2 and "model not found" in res.output
    (fake_data_dir / "piqa" / "piqa_validation.jsonl").unlink()
    res = invoke("eval", str(fp_dir), "--tasks", "piqa", "--data-dir", str(fake_data_dir))
    assert res.exit_code == 2 and "piqa_validation.jsonl" in res.output


# ---------------------------------------------------------------------- (5) real model + data


@pytest.mark.slow
def test_smollm2_wikitext2_and_piqa(smollm2_dir, data_dir):
    from eqat_cli.data import read_corpus
    from eqat_cli.eval.ppl_text import perplexity_text
    from eqat_cli.eval.perplexity import perplexity
    from eqat_cli.eval.zeroshot import plan_tasks, zeroshot
    from eqat_cli.models import resolve

    assert len(read_corpus("wikitext2", "test", data_dir)) == 4358  # = HF test rows
    lm = resolve(str(smollm2_dir), device="cpu")
    res = perplexity(lm.model, lm.tokenizer, perplexity_text("wikitext2", data_dir), seqlen=512, limit=2)
    assert res.windows == 2 and 5 < res.ppl < 100, res
    (piqa,) = zeroshot(lm.model, lm.tokenizer, plan_tasks(["piqa"], data_dir), data_dir, limit=20)
    assert piqa.n == 20 and 0.0 <= piqa.acc <= 1.0 and piqa.acc_norm is not None
