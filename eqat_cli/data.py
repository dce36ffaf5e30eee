"""Text data for calibration and perplexity: named sets (Hub or a local data dir) and local files.

A *name* (``wikitext2``, ``c4``, ``redpajama``; see ``eqat plugins`` / ``plugins/datasets.py``)
resolves to the Hugging Face Hub through ``datasets.load_dataset``, or, when a data dir is given
(``--data-dir`` / ``EQAT_DATA_DIR``), to the file ``data_dir / spec.local_files[split]``. Nothing
falls back silently: with a data dir set, a named set without a local copy is an error that says
which file was expected.

A *path* to a local file is read by its suffix:

* ``.raw``: WikiText raw form, one row per line (see :func:`wikitext_rows`);
* ``.txt``: documents separated by blank lines;
* ``.jsonl`` / ``.json``: one JSON object per line, the ``text`` field;
* ``.parquet``: the ``text`` column.

The perplexity protocols built on these corpora are in :mod:`eqat_cli.eval.ppl_text`; when the
Hub may be reached is :mod:`eqat_cli.hub`'s policy.

This module does not import torch; ``datasets`` / ``pyarrow`` are imported only when needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from eqat_cli.errors import BadInputError, EqatError, MissingDependencyError
from eqat_cli.hub import hub_access
from eqat_cli.readers import read_jsonl, read_text, sniff_text
from eqat_cli.registry import get_registry

FILE_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")
DATA_DIR_ENV = "EQAT_DATA_DIR"


@dataclass(frozen=True)
class TextSource:
    """Where a corpus will be read from, decided without reading it."""

    name: str  # the name or path as given
    kind: str  # "file" | "local" | "hub"
    path: Path | None = None  # file or local copy
    hub_path: str | None = None
    hub_name: str | None = None
    hub_target: str | None = None  # split name or data file on the Hub
    text_field: str = "text"

    def describe(self) -> str:
        if self.kind in ("file", "local"):
            return f"{self.kind}:{self.path}"
        extra = ", ".join(x for x in (self.hub_name, self.hub_target) if x)
        return f"hub:{self.hub_path}" + (f" ({extra})" if extra else "")


# ---------------------------------------------------------------------- resolution


def is_file_spec(name_or_path: str) -> bool:
    """A path to a local file (by suffix or existence) rather than a registered name."""
    p = Path(name_or_path).expanduser()
    return p.suffix.lower() in FILE_SUFFIXES or os.sep in name_or_path or p.is_file()


def dataset_spec(name: str):
    """The registered :class:`~eqat_cli.specs.DatasetSpec` called ``name``."""
    return get_registry().dataset(name)  # EqatError naming the known sets


def text_source(name_or_path: str, split: str, data_dir: Path | None) -> TextSource:
    """Decide where ``name_or_path`` / ``split`` comes from; check local files exist."""
    if is_file_spec(name_or_path):
        p = Path(name_or_path).expanduser()
        if not p.is_file():
            raise BadInputError(f"data file not found: {name_or_path}")
        if p.suffix.lower() not in FILE_SUFFIXES:
            raise BadInputError(
                f"{name_or_path}: unsupported data file type {p.suffix!r}; "
                f"use one of {', '.join(FILE_SUFFIXES)}"
            )
        if p.suffix.lower() != ".parquet":
            sniff_text(p, "data file")  # a binary file fails here, before any model is loaded
        return TextSource(name_or_path, "file", path=p)
    spec = dataset_spec(name_or_path)
    if spec.kind != "text":
        raise BadInputError(
            f"{name_or_path!r} is a zero-shot task, not a text corpus "
            f"(use it with `eqat eval --tasks {name_or_path}`)"
        )
    if data_dir is not None:
        if split not in spec.local_files:
            have = ", ".join(sorted(spec.local_files)) or "none"
            raise EqatError(
                f"data set {spec.name!r} has no local copy of split {split!r} "
                f"(local splits: {have}); data dir {data_dir} is set",
                hint=f"unset --data-dir / {DATA_DIR_ENV} to read it from the Hub",
            )
        path = Path(data_dir) / spec.local_files[split]
        if not path.is_file():
            raise EqatError(
                f"no local copy of {spec.name!r} ({split}): expected file {path}",
                hint=f"put the file there, or unset --data-dir / {DATA_DIR_ENV} to use the Hub",
            )
        return TextSource(spec.name, "local", path=path, text_field=spec.text_field)
    if not spec.hub_path or split not in spec.hub_splits:
        have = ", ".join(sorted(spec.hub_splits)) or "none"
        raise EqatError(f"data set {spec.name!r} has no split {split!r} on the Hub (splits: {have})")
    return TextSource(
        spec.name, "hub", hub_path=spec.hub_path, hub_name=spec.hub_name,
        hub_target=spec.hub_splits[split], text_field=spec.text_field,
    )


# ---------------------------------------------------------------------- readers


def wikitext_rows(text: str) -> list[str]:
    """Rows of a WikiText ``*.raw`` file, identical to the Hugging Face ``wikitext`` rows.

    Each line keeps its line end; a blank line (``" \\n"``) becomes an empty row
    (the shared data folder's ``PROVENANCE.md``, "Standard LLM perplexity protocol").
    """
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def blank_line_docs(text: str) -> list[str]:
    """Documents of a plain text file: paragraphs separated by blank lines."""
    docs, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def _read_jsonl(path: Path, field: str) -> list[str]:
    out = []
    for i, obj in read_jsonl(path, "data file"):
        if field not in obj:
            raise BadInputError(f"{path}:{i}: no {field!r} field")
        out.append(str(obj[field]))
    return out


def _read_parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError as e:  # pragma: no cover - pyarrow is a dependency
        raise MissingDependencyError("pyarrow", "reading .parquet files") from e
    try:
        names = pq.read_schema(path).names
        if field not in names:
            raise BadInputError(f"{path}: no {field!r} column (columns: {', '.join(names)})")
        table = pq.read_table(path, columns=[field])
        # Decoding happens here: a damaged string column raises UnicodeDecodeError.
        return [str(t) for t in table.column(field).to_pylist()]
    except BadInputError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for broken files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"{path}: cannot read parquet ({first})") from e


def read_file(path: Path, field: str = "text") -> list[str]:
    """Documents / rows of a local file, by suffix (see the module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, field)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, field)
    text = read_text(path, "data file")
    if suffix == ".raw":
        return wikitext_rows(text)
    return blank_line_docs(text)


def _read_hub(src: TextSource) -> list[str]:
    import datasets

    target = src.hub_target or ""
    with hub_access(datasets=True) as offline:
        try:
            return _load_hub(datasets, src, target)
        except EqatError:
            raise
        except Exception as e:  # datasets raises many types (offline, not found, auth)
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if offline:
                first = f"{offline} and no cached copy exists"
            raise EqatError(
                f"cannot load {src.name!r} from the Hugging Face Hub ({src.describe()}): {first}",
                hint=f"pass --data-dir / set {DATA_DIR_ENV} to a folder with local copies",
            ) from e


def _load_hub(datasets, src: TextSource, target: str) -> list[str]:
    """Read a named set from the Hub with ``datasets`` (errors are mapped by the caller)."""
    if "/" in target or target.endswith((".json.gz", ".json", ".jsonl", ".parquet")):
        # A file inside the repo (C4 shards): the GPTQ way of reading C4.
        ds = datasets.load_dataset(src.hub_path, data_files={"data": target}, split="data")
    else:
        ds = datasets.load_dataset(src.hub_path, src.hub_name, split=target)
    if src.text_field not in ds.column_names:
        raise EqatError(f"{src.describe()} has no {src.text_field!r} column")
    return [str(t) for t in ds[src.text_field]]


def read_source(src: TextSource) -> list[str]:
    if src.kind == "hub":
        return _read_hub(src)
    assert src.path is not None
    return read_file(src.path, src.text_field)


def read_corpus(name_or_path: str, split: str = "train", data_dir: Path | None = None) -> list[str]:
    """Documents (or WikiText rows) of raw text from a named set or a local file.

    ``data_dir`` None means the Hub for named sets. WikiText rows follow the protocol in
    :func:`wikitext_rows` (empty rows included, as on the Hub); C4 / parquet give the ``text``
    column, ``.jsonl`` the ``text`` field, ``.txt`` its blank-line-separated paragraphs.
    ``split`` is ignored for files.
    """
    return read_source(text_source(name_or_path, split, data_dir))
