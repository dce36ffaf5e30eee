"""The import rule of docs/ARCHITECTURE.md, checked on the source (like ``test_kernels_room.py``
does for ``eqat_kernels``): parse every module of ``eqat_cli`` with ``ast``, build the import
graph (imports inside functions included: a lazy import still couples two modules), and fail on

* an import the room table below does not allow (an upward import);
* any cycle between modules;
* a lazy import (inside a function) outside ``cli/`` and the plugins, unless the imported module
  is heavy (imports torch, transformers & co. at module level, itself or through eqat) and the
  importer is not: that is what keeps ``eqat --help``, ``eqat pull`` and the torch-free modules
  light. Any other lazy import is listed in :data:`LAZY_EXCEPTIONS` with its reason.

:data:`ALLOWED` is the "imports from eqat" column of docs/ARCHITECTURE.md's room table; a test
checks that the two agree.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

PKG = REPO / "eqat_cli"
SUBPACKAGE_ROOMS = ("cli", "train", "eval", "benchmark", "formats", "quant", "plugins")

# Rooms every library room may import: the bottom of the house (no eqat imports but errors).
FOUNDATION = {"errors", "progress", "scheme", "eqat_cli"}  # "eqat_cli": the package's __version__

# room -> rooms it may import (besides FOUNDATION and itself). Keep equal to docs/ARCHITECTURE.md.
ALLOWED: dict[str, set[str]] = {
    "cli": {"*"},  # the top: everything below it
    "train": {"quant", "quantize", "formats", "models", "model_files", "readers", "data", "registry", "device",
              "memory", "fsutil"},
    "eval": {"models", "data", "hub", "readers", "quant", "registry", "fsutil"},
    "benchmark": {"models", "model_files", "formats", "quant", "quantize", "registry", "memory", "device"},
    "pack": {"models", "formats", "format_spec", "registry", "fsutil"},
    "models": {"formats", "model_files", "readers", "hub", "registry", "device", "fsutil", "quant", "quantize"},
    "formats": {"quant", "model_files", "readers", "registry", "format_spec", "fsutil"},
    "quantize": {"quant"},
    "generate": {"models", "memory", "decode"},
    "pull": {"models", "formats", "fsutil"},
    "decode": {"quant"},
    "rotate": {"quant"},
    "quant": {"specs"},
    "data": {"readers", "hub", "registry"},
    "model_files": {"readers", "registry"},
    "readers": set(),
    "hub": set(),
    "registry": {"specs", "format_spec", "plugin_manager", "device"},
    "plugin_manager": {"hookspecs"},
    "hookspecs": {"specs", "format_spec"},
    "plugins": {"hookspecs", "specs", "quant", "formats"},
    "specs": set(),
    "format_spec": set(),
    "device": set(),
    "memory": set(),
    "fsutil": set(),
    "errors": set(),
    "progress": set(),
    "scheme": set(),
    "eqat_cli": set(),
}
# specs imports nothing of eqat, not even the foundation (plugins and hookspecs build on it).
NO_FOUNDATION = {"specs", "errors", "progress", "eqat_cli"}

# Packages whose import makes a module heavy (seconds of start-up, torch's memory).
HEAVY = {"torch", "transformers", "datasets", "lm_eval", "triton", "accelerate", "numpy", "gguf", "pyarrow"}

# importer -> (the modules it may import lazily, why): lazy imports in library rooms that are
# neither cli/ nor plugins and do not keep a heavy module out of a light one. Empty: every such
# import is at module level (issue #25). An entry needs a reason a reviewer can check, e.g. a cycle
# that no move of code can break; prefer moving the code to the right room.
LAZY_EXCEPTIONS: dict[str, tuple[set[str], str]] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    lazy: bool  # inside a function
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "eqat_cli"
    if parts[1] in SUBPACKAGE_ROOMS:
        return parts[1]
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The eqat module an import names (``from eqat_cli.x import y``: ``eqat_cli.x.y`` if that is a
    module, else ``eqat_cli.x``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: set[str]) -> tuple[list[Import], set[str]]:
    """The eqat imports of one module, and the top-level names of the external packages it
    imports at module level."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []
    external: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def visit(node: ast.AST, lazy: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            in_fn = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tonly = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module if is_pkg else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in child.names] if base.startswith("eqat_cli") else [base]
            for n in names:
                if n.startswith("eqat_cli"):
                    target = _resolve(n, known)
                    if target and target != module and not tonly:
                        found.append(Import(module, target, in_fn, child.lineno))
                elif not in_fn and not tonly and n:
                    external.add(n.split(".")[0])
            visit(child, in_fn, tonly)

    visit(tree, False, False)
    return found, external


def graph() -> tuple[list[Import], dict[str, set[str]]]:
    mods = modules()
    known = set(mods)
    edges: list[Import] = []
    external: dict[str, set[str]] = {}
    for m, p in mods.items():
        imps, ext = imports_of(m, p, known)
        edges += imps
        external[m] = ext
    return edges, external


def _is_ancestor(pkg: str, module: str) -> bool:
    return module.startswith(pkg + ".")


def heavy_modules(edges: list[Import], external: dict[str, set[str]]) -> set[str]:
    """Modules that import a :data:`HEAVY` package at module level, directly or through eqat
    modules they import at module level (a package's ``__init__`` included)."""
    heavy = {m for m, ext in external.items() if ext & HEAVY}
    top = {}
    for e in edges:
        if not e.lazy:
            top.setdefault(e.importer, set()).add(e.imported)
    for m in list(external):  # importing a submodule runs its packages' __init__ first
        parts = m.split(".")
        for i in range(1, len(parts)):
            top.setdefault(m, set()).add(".".join(parts[:i]))
    changed = True
    while changed:
        changed = False
        for m, targets in top.items():
            if m not in heavy and targets & heavy:
                heavy.add(m)
                changed = True
    return heavy


def test_no_upward_import():
    edges, _ = graph()
    bad = []
    for e in edges:
        a, b = room(e.importer), room(e.imported)
        if a == b:
            continue
        allowed = ALLOWED[a] | (set() if a in NO_FOUNDATION else FOUNDATION)
        if "*" not in allowed and b not in allowed:
            bad.append(f"{e.importer} (room {a}) imports {e.imported} (room {b}), line {e.line}"
                       f"{' (inside a function)' if e.lazy else ''}")
    assert not bad, "imports against docs/ARCHITECTURE.md's table:\n" + "\n".join(bad)


def _cycles(adj: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle():
    """Between modules, lazy imports included. A submodule importing its own package (which
    Python imports first anyway) is not an edge."""
    edges, _ = graph()
    adj: dict[str, set[str]] = {}
    for e in edges:
        if _is_ancestor(e.imported, e.importer):
            continue
        adj.setdefault(e.importer, set()).add(e.imported)
    cycles = _cycles(adj)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
    rooms: dict[str, set[str]] = {}
    for e in edges:
        a, b = room(e.importer), room(e.imported)
        if a != b and not (a == "eqat_cli" or b == "eqat_cli"):
            rooms.setdefault(a, set()).add(b)
    room_cycles = _cycles(rooms)
    assert not room_cycles, "cycles between rooms: " + "; ".join(" <-> ".join(c) for c in room_cycles)


def test_lazy_imports_only_where_start_up_needs_them():
    edges, external = graph()
    heavy = heavy_modules(edges, external)
    bad, used = [], set()
    for e in edges:
        if not e.lazy or room(e.importer) in ("cli", "plugins") or _is_ancestor(e.imported, e.importer):
            continue
        if e.imported in heavy and e.importer not in heavy:
            continue  # keeps torch & co. out of a light module
        if e.imported in LAZY_EXCEPTIONS.get(e.importer, (set(), ""))[0]:
            used.add((e.importer, e.imported))
            continue
        bad.append(f"{e.importer}:{e.line} imports {e.imported} inside a function")
    assert not bad, "lazy imports that are not needed for start-up (import at module level, or list " \
                    "in LAZY_EXCEPTIONS with a reason):\n" + "\n".join(sorted(bad))
    listed = {(m, t) for m, (targets, _) in LAZY_EXCEPTIONS.items() for t in targets}
    assert used == listed, f"stale LAZY_EXCEPTIONS (now at module level or gone): {sorted(listed - used)}"


def test_architecture_doc_lists_the_same_imports():
    """docs/ARCHITECTURE.md's room table: every room has a row and its "imports from eqat" column
    names exactly the rooms :data:`ALLOWED` allows (the foundation may be named or not)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| `eqat_cli/"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`(?:eqat_cli/)?([\w]+)(?:\.py|/)`", cells[0]):
            rows[name] = cells[2]
    missing = sorted(r for r in ALLOWED if r not in rows and r != "eqat_cli")
    assert not missing, f"rooms without a row in docs/ARCHITECTURE.md: {missing}"
    wrong = []
    for r, allowed in ALLOWED.items():
        if r in ("cli", "eqat_cli"):
            continue
        named = {w.split(".")[0].rstrip("/") for w in re.findall(r"`([\w./]+)`", rows[r])}
        named = (named & set(ALLOWED)) - {r, "eqat_cli"}  # module names; not files like `caps.py`
        if named - FOUNDATION != allowed - FOUNDATION:
            wrong.append(f"{r}: the doc names {sorted(named - FOUNDATION)}, the test allows {sorted(allowed)}")
    assert not wrong, "docs/ARCHITECTURE.md's import column disagrees:\n" + "\n".join(wrong)
