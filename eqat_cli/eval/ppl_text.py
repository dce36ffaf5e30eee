"""The perplexity texts: a named set or a file becomes the one text a perplexity run tokenizes.

The protocols (:data:`PPL_PROTOCOLS`) follow GPTQ / EfficientQAT exactly: WikiText-2 test rows
joined with two newlines; C4 = the first 1100 documents of validation shard 00000 joined with
one space, of which the first ``256 * seqlen`` tokens are used. The corpora themselves are read
by :mod:`eqat_cli.data`. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eqat_cli.data import dataset_spec, is_file_spec, read_file, read_source, text_source
from eqat_cli.errors import BadInputError
from eqat_cli.readers import read_text


@dataclass(frozen=True)
class PplProtocol:
    """How a named set becomes one perplexity text (GPTQ / EfficientQAT conventions)."""

    split: str
    joiner: str
    max_docs: int | None = None  # use only the first N documents
    max_windows: int | None = None  # keep only the first max_windows * seqlen tokens
    description: str = ""


PPL_PROTOCOLS = {
    "wikitext2": PplProtocol(
        split="test",
        joiner="\n\n",
        description="WikiText-2 raw test rows joined with '\\n\\n', tokenized once, "
        "non-overlapping windows (GPTQ / EfficientQAT)",
    ),
    "c4": PplProtocol(
        split="validation",
        joiner=" ",
        max_docs=1100,
        max_windows=256,
        description="first 1100 documents of the C4 validation split joined with ' ', "
        "first 256*seqlen tokens, non-overlapping windows (GPTQ / EfficientQAT)",
    ),
}
FILE_PROTOCOL = "documents of the file joined with '\\n\\n' (.txt: the file text as is), " \
    "non-overlapping windows"

# Local copies that are not the data set the published numbers were measured on.
LOCAL_CAVEATS = {
    "c4": "the local C4 copy is a 2,000-document validation slice of unknown selection, not "
    "GPTQ's C4 set (first 1100 documents of validation shard 00000): this perplexity is NOT "
    "comparable to published C4 numbers",
}


@dataclass
class PplCorpus:
    """One perplexity text plus how it was made (recorded in results)."""

    name: str
    text: str
    source: str
    protocol: str
    max_windows: int | None = None
    comparable: bool = True  # comparable to published numbers for this set name
    note: str | None = None


# ---------------------------------------------------------------------- perplexity text


def check_ppl_set(name_or_path: str, data_dir: Path | None) -> TextSource:
    """Validate a ``--ppl`` entry without reading it (cheap; run before loading a model)."""
    if not is_file_spec(name_or_path) and name_or_path not in PPL_PROTOCOLS:
        spec = dataset_spec(name_or_path)  # unknown name -> EqatError listing the known sets
        raise BadInputError(
            f"{spec.name!r} has no perplexity protocol; perplexity sets: "
            f"{', '.join(PPL_PROTOCOLS)} or a .txt/.raw/.jsonl/.parquet file"
        )
    split = PPL_PROTOCOLS[name_or_path].split if name_or_path in PPL_PROTOCOLS else ""
    return text_source(name_or_path, split, data_dir)


def perplexity_text(name_or_path: str, data_dir: Path | None = None) -> PplCorpus:
    """The single text a perplexity run tokenizes, built exactly per :data:`PPL_PROTOCOLS`."""
    src = check_ppl_set(name_or_path, data_dir)
    if src.kind == "file":
        assert src.path is not None
        if src.path.suffix.lower() == ".txt":
            text = read_text(src.path, "data file")
        else:
            text = "\n\n".join(read_file(src.path))
        return PplCorpus(name_or_path, text, src.describe(), FILE_PROTOCOL, comparable=False)
    proto = PPL_PROTOCOLS[name_or_path]
    docs = read_source(src)
    if proto.max_docs is not None:
        docs = docs[: proto.max_docs]
    caveat = LOCAL_CAVEATS.get(name_or_path) if src.kind == "local" else None
    return PplCorpus(
        name=name_or_path,
        text=proto.joiner.join(docs),
        source=src.describe(),
        protocol=proto.description,
        max_windows=proto.max_windows,
        comparable=caveat is None,
        note=caveat,
    )
