"""``eqat plugins``: what is registered, where it came from, and which backends can run here."""

from __future__ import annotations

from typing import Annotated

import typer

from eqat_cli.cli.common import BITS, JsonOpt, console, emit_json


def plugins_cmd(
    device: Annotated[str, typer.Option("--device", help="Device to check backends for: auto, cpu, cuda.")] = "auto",
    bits: Annotated[int, typer.Option("--bits", help="Bit width to check backends for."), BITS] = 2,
    json_out: JsonOpt = None,
):
    """Example: [bold]eqat plugins --device cuda --bits 4[/]
    """
    from rich.table import Table

    from eqat_cli.plugin_manager import get_plugin_manager, plugin_source
    from eqat_cli.registry import get_registry

    pm = get_plugin_manager()
    reg = get_registry()
    src = {pm.get_name(p): plugin_source(pm, p) for p in pm.get_plugins()}
    if device == "auto":
        from eqat_cli.device import pick_device

        device = pick_device("auto").type
    result = {"architectures": [], "backends": [], "datasets": [], "plugins": src}

    t = Table(title="Architectures")
    for col in ("name", "model_type", "plugin", "source", "description"):
        t.add_column(col)
    for name, r in reg.architectures.items():
        t.add_row(name, ", ".join(r.spec.model_types), r.plugin, src.get(r.plugin, "?"), r.spec.description)
        result["architectures"].append(
            {"name": name, "model_types": list(r.spec.model_types), "plugin": r.plugin, "source": src.get(r.plugin)}
        )
    console.print(t)

    chosen = None
    try:
        chosen, why = reg.select_backend("auto", bits, device)
    except Exception as e:
        why = str(e)
    t = Table(title=f"Kernel backends ({bits}-bit on {device})")
    for col in ("name", "priority", "devices", "bits", "group sizes", "backward", "usable here", "why", "plugin"):
        t.add_column(col)
    for spec, ok, reason in reg.explain_backends(bits, device):
        plugin = reg.backends[spec.name].plugin
        caps = spec.caps
        t.add_row(
            spec.name, str(spec.priority), ", ".join(spec.devices), ",".join(map(str, spec.bits)),
            "any" if caps.group_sizes is None else ",".join(map(str, caps.group_sizes)),
            ", ".join(caps.backward) or "none", "[green]yes[/]" if ok else "[red]no[/]", reason, plugin,
        )
        result["backends"].append(
            {"name": spec.name, "priority": spec.priority, "devices": list(spec.devices),
             "bits": list(spec.bits),
             "group_sizes": None if caps.group_sizes is None else list(caps.group_sizes),
             "backward": list(caps.backward), "usable": ok, "reason": reason, "plugin": plugin,
             "source": src.get(plugin)}
        )
    console.print(t)
    console.print(f"auto selects: [bold]{chosen.name if chosen else 'none'}[/] - {why}")
    result["auto"] = {"backend": chosen.name if chosen else None, "why": why}

    t = Table(title="Data sets")
    for col in ("name", "kind", "hub", "local copy (under --data-dir)", "plugin"):
        t.add_column(col)
    for name, r in reg.datasets.items():
        s = r.spec
        hub = s.hub_path + (f" [{s.hub_name}]" if s.hub_name else "") if s.hub_path else "-"
        local = ", ".join(f"{k}: {v}" for k, v in s.local_files.items()) or "-"
        t.add_row(name, s.kind, hub, local, r.plugin)
        result["datasets"].append(
            {"name": name, "kind": s.kind, "hub": s.hub_path, "local_files": s.local_files, "plugin": r.plugin}
        )
    console.print(t)
    emit_json(result, json_out)
