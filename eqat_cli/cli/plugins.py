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

    from eqat_cli.registry import plugins_report

    r = plugins_report(device, bits)
    t = Table(title="Architectures")
    for col in ("name", "model_type", "plugin", "source", "description"):
        t.add_column(col)
    for a in r["architectures"]:
        t.add_row(a["name"], ", ".join(a["model_types"]), a["plugin"], a["source"] or "?", a["description"])
    console.print(t)

    t = Table(title=f"Kernel backends ({r['bits']}-bit on {r['device']})")
    for col in ("name", "priority", "devices", "bits", "group sizes", "backward", "usable here", "why", "plugin"):
        t.add_column(col)
    for b in r["backends"]:
        t.add_row(
            b["name"], str(b["priority"]), ", ".join(b["devices"]), ",".join(map(str, b["bits"])),
            "any" if b["group_sizes"] is None else ",".join(map(str, b["group_sizes"])),
            ", ".join(b["backward"]) or "none", "[green]yes[/]" if b["usable"] else "[red]no[/]", b["reason"],
            b["plugin"],
        )
    console.print(t)
    console.print(f"auto selects: [bold]{r['auto']['backend'] or 'none'}[/] - {r['auto']['why']}")

    t = Table(title="Data sets")
    for col in ("name", "kind", "hub", "local copy (under --data-dir)", "plugin"):
        t.add_column(col)
    for d in r["datasets"]:
        hub = d["hub"] + (f" [{d['hub_name']}]" if d["hub_name"] else "") if d["hub"] else "-"
        local = ", ".join(f"{k}: {v}" for k, v in d["local_files"].items()) or "-"
        t.add_row(d["name"], d["kind"], hub, local, d["plugin"])
    console.print(t)
    emit_json(r, json_out)
