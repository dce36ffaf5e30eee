"""The registry: what the plugins registered, validated, and the lookups that explain every
rejected candidate.

The spec dataclasses live in :mod:`eqat_cli.specs`; they are re-exported here
(``from eqat_cli.registry import ArchitectureSpec`` keeps working for plugins written before the
move; new code imports them from ``eqat_cli.specs``). This module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from eqat_cli.errors import EqatError, UnknownArchitectureError, UnsupportedError
from eqat_cli.format_spec import Format, FormatTable
from eqat_cli.plugin_manager import get_plugin_manager, plugin_source
from eqat_cli.specs import bits_label

# Re-exported for plugins written against ``eqat_cli.registry`` (see the module docstring).
from eqat_cli.specs import ArchitectureSpec, BackendSpec, DatasetSpec, KernelCaps, replace

__all__ = [
    "ArchitectureSpec", "BackendSpec", "DatasetSpec", "KernelCaps", "Registered", "Registry",
    "get_registry", "replace", "reset_registry",
]


@dataclass
class Registered:
    spec: Any
    plugin: str


class Registry:
    """Everything the plugins registered, validated."""

    def __init__(self, pm):
        self.pm = pm
        self.architectures: dict[str, Registered] = {}
        self.backends: dict[str, Registered] = {}
        self.datasets: dict[str, Registered] = {}
        self.formats: dict[str, Registered] = {}
        self._collect()

    def _collect(self) -> None:
        hooks = [
            ("register_architectures", ArchitectureSpec, self.architectures),
            ("register_backends", BackendSpec, self.backends),
            ("register_datasets", DatasetSpec, self.datasets),
        ]

        hooks.append(("register_formats", Format, self.formats))
        for hook_name, cls, table in hooks:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin)

                def register(spec, _cls=cls, _table=table, _plugin=plugin_name):
                    self._add(_cls, _table, spec, _plugin)

                impl.function(register)
        seen: dict[str, str] = {}
        for name, reg in self.architectures.items():
            for mt in reg.spec.model_types:
                if mt in seen:
                    raise EqatError(
                        f"model_type {mt!r} is claimed by architectures {seen[mt]!r} and {name!r}"
                    )
                seen[mt] = name
        self._format_table = FormatTable()
        for name, reg in self.formats.items():
            self._format_table.add(reg.spec, reg.plugin)

    @staticmethod
    def _add(cls, table: dict, spec: Any, plugin: str) -> None:
        if not isinstance(spec, cls):
            raise EqatError(
                f"plugin {plugin!r} registered a {type(spec).__name__}, expected {cls.__name__}"
            )
        if spec.name in table:
            raise EqatError(
                f"{cls.__name__} {spec.name!r} registered twice "
                f"(by {table[spec.name].plugin!r} and {plugin!r})"
            )
        table[spec.name] = Registered(spec, plugin)

    # ------------------------------------------------------------------ lookups
    def find_architecture(self, model_type: str) -> ArchitectureSpec | None:
        """The architecture that claims ``model_type``, or None."""
        for reg in self.architectures.values():
            if model_type in reg.spec.model_types:
                return reg.spec
        return None

    def architecture_for(self, model_type: str) -> ArchitectureSpec:
        spec = self.find_architecture(model_type)
        if spec is not None:
            return spec
        known = sorted(mt for r in self.architectures.values() for mt in r.spec.model_types)
        raise UnknownArchitectureError(
            f"unknown architecture (model_type {model_type!r}); known: {', '.join(known)}",
            hint="an architecture plugin can add it (see `eqat plugins`)",
        )

    def architecture(self, name: str) -> ArchitectureSpec:
        if name not in self.architectures:
            raise UnknownArchitectureError(
                f"unknown architecture {name!r}; known: {', '.join(sorted(self.architectures))}"
            )
        return self.architectures[name].spec

    def format(self, name: str):
        """The output :class:`~eqat_cli.format_spec.Format` called ``name`` (or one of its
        aliases, in any case, ``-`` or ``_``); a one-line error listing the choices otherwise."""
        return self._format_table.get(name)

    def format_name(self, name: str) -> str:
        """The canonical name of a format name or alias (e.g. ``native`` -> ``eqat``)."""
        return self._format_table.canonical(name)

    def format_names(self) -> tuple[str, ...]:
        return self._format_table.names()

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise EqatError(
                f"unknown data set {name!r}; known: {', '.join(sorted(self.datasets))} "
                "(or give a path to a .txt, .jsonl or .parquet file)"
            )
        return self.datasets[name].spec

    def explain_backends(
        self,
        bits: int | Iterable[int],
        device: str,
        group_size: int | Iterable[int] | None = None,
        trains: Iterable[str] = (),
    ) -> list[tuple[BackendSpec, bool, str]]:
        """Every backend, best first, with whether it can run here and why (not).

        ``bits`` and ``group_size`` are one value or all of a model's (``group_size=None``
        leaves groups out); with ``trains`` (e.g. ``("scales",)``) a backend must also
        differentiate those tensors. Each backend answers from its kernel's ``KernelCaps``.

        Ints, not :class:`~eqat_cli.scheme.QuantScheme`: the question is over the *sets* of bit
        widths and group sizes of a model's layers (mixed models included), or over bits alone
        (``eqat plugins --bits``), and it is answered by ``KernelCaps``, which plugins declare in
        :mod:`eqat_cli.specs` (imports nothing of eqat). A caller with schemes passes
        ``[s.bits for s in schemes]`` and ``[s.group_size for s in schemes]``.
        """
        trains = tuple(trains)
        rows = []
        for reg in sorted(self.backends.values(), key=lambda r: -r.spec.priority):
            ok, reason = reg.spec.supports(bits, device, group_size, trains)
            rows.append((reg.spec, ok, reason))
        return rows

    def select_backend(
        self,
        name: str,
        bits: int | Iterable[int],
        device: str,
        group_size: int | Iterable[int] | None = None,
    ) -> tuple[BackendSpec, str]:
        """Pick a backend (``auto`` = highest priority that fits). Returns it and why."""
        rows = self.explain_backends(bits, device, group_size)
        label = bits_label(bits)
        if name != "auto":
            for spec, ok, reason in rows:
                if spec.name == name:
                    if not ok:
                        raise UnsupportedError(
                            f"backend {name!r} cannot run {label}-bit layers on {device}: {reason}"
                        )
                    return spec, f"{name}: requested ({reason})"
            raise EqatError(
                f"unknown backend {name!r}; known: {', '.join(s.name for s, _, _ in rows)}"
            )
        rejected = []
        for spec, ok, reason in rows:
            if ok:
                why = f"{spec.name}: highest-priority backend available on {device}"
                if rejected:
                    why += " (" + "; ".join(rejected) + ")"
                return spec, why
            rejected.append(f"{spec.name} rejected: {reason}")
        raise UnsupportedError(
            f"no backend can run {label}-bit layers on {device}: " + "; ".join(rejected)
        )

    def training_backend(
        self,
        bits: int | Iterable[int],
        device: str,
        group_size: int | Iterable[int] | None = None,
        trains: Iterable[str] = ("scales",),
    ) -> tuple[BackendSpec, str]:
        """The highest-priority backend available on ``device`` for these layers whose kernel has
        a backward for ``trains`` (E2E-QP: the step sizes, and the zero points with
        ``--train-zeros``). Returns it and why; raises :class:`UnsupportedError` naming every
        rejected backend when none fits."""
        trains = tuple(trains)
        rows = self.explain_backends(bits, device, group_size, trains)
        rejected = []
        for spec, ok, reason in rows:
            if ok:
                why = (
                    f"{spec.name}: highest-priority backend on {device} whose kernel "
                    f"differentiates {' and '.join(trains)}"
                )
                if rejected:
                    why += " (" + "; ".join(rejected) + ")"
                return spec, why
            rejected.append(f"{spec.name} rejected: {reason}")
        raise UnsupportedError(
            f"no backend can train the {' and '.join(trains)} of {bits_label(bits)}-bit layers "
            f"on {device}: " + ("; ".join(rejected) or "no backends registered"),
            hint="a backend plugin whose KernelCaps declares that backward can add one "
            "(see `eqat plugins`)",
        )


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry(get_plugin_manager())
    return _REGISTRY


def reset_registry(reload_plugins: bool = False) -> None:
    """Re-collect registrations (after ``pm.register``/``unregister``); optionally reload plugins."""
    global _REGISTRY
    if reload_plugins:
        get_plugin_manager.cache_clear()
    _REGISTRY = None


def plugins_report(device: str = "auto", bits: int = 2) -> dict:
    """``eqat plugins``' library entry: every registered architecture, backend (with why it can
    or cannot run ``bits`` on ``device``, and which one ``auto`` selects) and data set, and where
    each plugin came from. ``device`` ``auto`` is the device eqat would pick here."""
    if device == "auto":
        from eqat_cli.device import pick_device  # torch: the registry is imported by `eqat --help`

        device = pick_device("auto").type
    reg = get_registry()
    pm = reg.pm
    src = {pm.get_name(p): plugin_source(pm, p) for p in pm.get_plugins()}
    out: dict = {"device": device, "bits": bits, "architectures": [], "backends": [], "datasets": [],
                 "plugins": src}
    for name, r in reg.architectures.items():
        out["architectures"].append({"name": name, "model_types": list(r.spec.model_types), "plugin": r.plugin,
                                     "source": src.get(r.plugin), "description": r.spec.description})
    chosen = None
    try:
        chosen, why = reg.select_backend("auto", bits, device)
    except Exception as e:  # noqa: BLE001 - reported as the reason, like every other refusal here
        why = str(e)
    for spec, ok, reason in reg.explain_backends(bits, device):
        plugin = reg.backends[spec.name].plugin
        caps = spec.caps
        out["backends"].append(
            {"name": spec.name, "priority": spec.priority, "devices": list(spec.devices), "bits": list(spec.bits),
             "group_sizes": None if caps.group_sizes is None else list(caps.group_sizes),
             "backward": list(caps.backward), "usable": ok, "reason": reason, "plugin": plugin,
             "source": src.get(plugin)}
        )
    out["auto"] = {"backend": chosen.name if chosen else None, "why": why}
    for name, r in reg.datasets.items():
        s = r.spec
        out["datasets"].append({"name": name, "kind": s.kind, "hub": s.hub_path, "hub_name": s.hub_name,
                                "local_files": s.local_files, "plugin": r.plugin})
    return out
