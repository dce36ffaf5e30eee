"""The pluggy plugin manager: built-ins and entry-point plugins, registered the same way.

``EQAT_BLOCK_PLUGINS=name1,name2`` blocks plugins by name (built-in or third-party).
Hook implementations that match no hookspec are rejected (``check_pending``).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import pluggy

from eqat_cli import hookspecs
from eqat_cli.errors import EqatError

ENTRY_POINT_GROUP = "eqat"
BLOCK_ENV = "EQAT_BLOCK_PLUGINS"

# Registered by module path when the package's entry points are not installed (e.g. running from
# a source tree); normally they arrive through the entry-point group like any other plugin.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("llama", "eqat_cli.plugins.llama"),
    ("mistral", "eqat_cli.plugins.mistral"),
    ("llava", "eqat_cli.plugins.llava"),
    ("qwen2", "eqat_cli.plugins.qwen2"),
    ("qwen3", "eqat_cli.plugins.qwen3"),
    ("gemma3", "eqat_cli.plugins.gemma3"),
    ("backend_torch", "eqat_cli.plugins.backend_torch"),
    ("backend_cpu", "eqat_cli.plugins.backend_cpu"),
    ("backend_triton", "eqat_cli.plugins.backend_triton"),
    ("backend_reference", "eqat_cli.plugins.backend_reference"),
    ("datasets", "eqat_cli.plugins.datasets"),
    ("formats", "eqat_cli.plugins.formats"),
)


def blocked_names() -> list[str]:
    return [n.strip() for n in os.environ.get(BLOCK_ENV, "").split(",") if n.strip()]


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as e:
        raise EqatError(f"plugin '{name}' is invalid: {e}") from e


def build_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked_names():
        pm.set_blocked(name)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except pluggy.PluginValidationError as e:
            raise EqatError(f"an installed eqat plugin is invalid: {e}") from e
    for name, module in DEFAULT_PLUGINS:
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        _register(pm, importlib.import_module(module), name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise EqatError(f"plugin hook has no matching hookspec: {e}") from e
    return pm


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    return build_plugin_manager()


def plugin_source(pm: pluggy.PluginManager, plugin: object) -> str:
    """Where a plugin came from: its distribution (entry point) or 'built-in'."""
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            name = getattr(dist, "project_name", None) or dist.metadata["name"]
            return f"{name} {dist.version} (entry point)"
    return "built-in (module path)"
