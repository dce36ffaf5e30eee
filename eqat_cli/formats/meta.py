"""The ``eqat`` section of a checkpoint's ``config.json``, as one dataclass written and read back.

Every checkpoint eqat writes as a directory records how it was made in ``config.json["eqat"]``
(docs/FORMATS.md): the format, the quantization scheme (bits and group size, written once, at the
top of the section), the architecture, the method, where the weights came from and the recipes
that made them. :class:`CheckpointMeta` is that section; :meth:`CheckpointMeta.to_dict` writes it
and :meth:`CheckpointMeta.from_dict` reads it back, including checkpoints written before the
scheme was written once (then it is read from ``block_ap.bits`` / ``block_ap.group_size`` when the
top-level keys are absent). Keys this version does not know are kept in ``extra`` and written
back unchanged.

Torch-free; imports nothing of eqat but :mod:`eqat_cli.scheme` and :mod:`eqat_cli.errors`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from eqat_cli.errors import BadInputError, EqatError
from eqat_cli.scheme import QuantScheme

SECTION = "eqat"  # the key of the section in config.json
FORMAT_VERSION = 1

# The fields with a home of their own; everything else is carried in ``extra``.
_NAMED = ("architecture", "method", "source_model", "calibration", "block_ap", "e2e_qp", "e2e_selected", "target")
_SCHEME_KEYS = ("bits", "group_size")


@dataclass
class CheckpointMeta:
    """What ``config.json["eqat"]`` says about a checkpoint.

    ``scheme`` is the one record of bits and group size (``None``: not a quantized checkpoint, or
    one of several schemes); the recipe sections (``block_ap``, ``e2e_qp``) never repeat them.
    """

    format: str = "eqat"
    format_version: int = FORMAT_VERSION
    scheme: QuantScheme | None = None
    architecture: str | None = None
    method: str | None = None  # rtn | gptq | block-ap (how the packed weights were made)
    source_model: str | None = None
    calibration: dict | None = None
    block_ap: dict | None = None  # Block-AP's recipe (BlockAPConfig.to_json() without bits/group)
    e2e_qp: dict | None = None  # E2E-QP's recipe and run
    e2e_selected: str | None = None  # "best" or "last"
    target: str | None = None  # "gguf:q2_k" ...: layers trained on that GGML grid, stored as its blocks
    # Mixed precision: the scheme of every packed layer by module path (then ``scheme`` is None and
    # the section's ``bits`` lists the widths used). Written as ``"modules": {path: "w3g64"}``.
    modules: dict[str, QuantScheme] | None = None
    extra: dict = field(default_factory=dict)  # any other key (pack's provenance, future keys)

    # -- write ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The section as written into ``config.json`` (keys with no value are left out)."""
        d: dict[str, Any] = {"format": self.format, "format_version": self.format_version}
        if self.scheme is not None:
            d["bits"], d["group_size"] = self.scheme.bits, self.scheme.group_size
        for name in _NAMED:
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        if self.block_ap is not None:
            d["block_ap"] = {k: v for k, v in self.block_ap.items() if k not in _SCHEME_KEYS}
        if self.modules:
            # The per-layer record wins over any single scheme: bits/group_size only summarise it.
            d["modules"] = {name: s.tag for name, s in sorted(self.modules.items())}
            d["bits"] = sorted({s.bits for s in self.modules.values()})
            groups = sorted({s.group_size for s in self.modules.values()})
            d["group_size"] = groups[0] if len(groups) == 1 else groups
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    def updated(self, values: Mapping[str, Any] | None = None, **changes: Any) -> "CheckpointMeta":
        """A copy with ``values`` (a section-style dict: ``bits``/``group_size`` set the scheme,
        unknown keys go to ``extra``) and then ``changes`` (field names) applied."""
        new = dataclasses.replace(self, extra=dict(self.extra))
        if values:
            vals = dict(values)
            vals.pop("format", None)
            vals.pop("format_version", None)
            if any(k in vals for k in _SCHEME_KEYS):
                bits = vals.pop("bits", new.scheme.bits if new.scheme else None)
                group = vals.pop("group_size", new.scheme.group_size if new.scheme else None)
                new.scheme = _scheme(bits, group, "metadata")
                if new.scheme is None:  # several schemes (lists) or half of one: kept as given
                    vals.update({k: v for k, v in (("bits", bits), ("group_size", group)) if v is not None})
            for k, v in vals.items():
                if k in _NAMED:
                    setattr(new, k, v)
                else:
                    new.extra[k] = v
        return dataclasses.replace(new, **changes) if changes else new

    # -- read -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, section: Mapping[str, Any], where: str = "config.json") -> "CheckpointMeta":
        """Read a section back. The scheme comes from the top-level ``bits``/``group_size``, or
        (checkpoints written before it was recorded once) from ``block_ap``'s; a malformed value
        is one :class:`BadInputError` naming ``where``."""
        if not isinstance(section, Mapping):
            raise BadInputError(f"{where}: the eqat section is not a JSON object")
        d = dict(section)
        block_ap = d.get("block_ap") if isinstance(d.get("block_ap"), dict) else None
        bits, group = d.pop("bits", None), d.pop("group_size", None)
        if bits is None and block_ap is not None:
            bits = block_ap.get("bits")
        if group is None and block_ap is not None:
            group = block_ap.get("group_size")
        scheme = _scheme(bits, group, where)
        if scheme is None and (bits is not None or group is not None):
            # Several schemes (lists) or half of one: keep what was written, declare nothing.
            d.update({k: v for k, v in (("bits", bits), ("group_size", group)) if v is not None})
        modules = _modules(d.pop("modules", None), where)
        if modules:  # the per-layer record; the section's bits/group_size only summarise it
            scheme = None
            d.pop("bits", None)
            d.pop("group_size", None)
        meta = cls(format=str(d.pop("format", "eqat")), format_version=d.pop("format_version", FORMAT_VERSION),
                   scheme=scheme, modules=modules)
        for name in _NAMED:
            if name in d:
                setattr(meta, name, d.pop(name))
        meta.extra = d
        return meta

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.json") -> "CheckpointMeta | None":
        """The section of a ``config.json`` dict, or ``None`` when it has none (a foreign checkpoint)."""
        section = config.get(SECTION)
        return cls.from_dict(section, where) if isinstance(section, Mapping) else None

    def provenance(self) -> dict:
        """The section without its ``format`` / ``format_version`` (what ``eqat pack`` carries over
        into a re-written native checkpoint)."""
        d = self.to_dict()
        d.pop("format")
        d.pop("format_version")
        return d


def _modules(value: Any, where: str) -> dict[str, QuantScheme] | None:
    """The ``modules`` map (path -> ``"w3g64"``) read back; a malformed one is one error."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadInputError(f"{where}: the eqat section's modules is not a map of module path to scheme (e.g. w3g64)")
    try:
        return {k: QuantScheme.parse(v) for k, v in value.items()}
    except EqatError as e:
        raise BadInputError(f"{where}: the eqat section's modules: {e}") from None


def _scheme(bits: Any, group: Any, where: str) -> QuantScheme | None:
    """The scheme two integers declare (an invalid one is an error); ``None`` for anything else
    (absent, or lists: a model of several schemes)."""
    if not (isinstance(bits, int) and isinstance(group, int)) or isinstance(bits, bool) or isinstance(group, bool):
        return None
    try:
        return QuantScheme(int(bits), int(group))
    except (EqatError, TypeError, ValueError) as e:
        raise BadInputError(f"{where}: the eqat section declares bits={bits!r}, group_size={group!r} ({e})") from None
