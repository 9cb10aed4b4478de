"""Structure rules of the sam_geo package, read from the source with ``ast``.

Nothing of sam_geo is imported: every ``.py`` file under ``sam_geo/`` is parsed, so the
rules hold for code no test happens to import. Each rule is one test whose failure
message lists every offender (file, line, what):

* no import cycle among sam_geo modules (imports anywhere in a file count, inside
  functions too; those under ``if TYPE_CHECKING:`` do not, as they never run);
* no private name (``_name``; dunders such as ``__version__`` are fine) imported from,
  or read as an attribute of, another sam_geo module: shared helpers are public;
* no function or method longer than :data:`MAX_FUNCTION_LINES` lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "sam_geo"
ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / PACKAGE
MAX_FUNCTION_LINES = 80
"""Hard limit on ``end_lineno - lineno + 1`` of a ``def`` (the style aims at 60)."""


@dataclass(frozen=True)
class Source:
    """One parsed module: dotted name, path relative to the repository, syntax tree."""

    module: str
    path: str
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.endswith("__init__.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _load_sources() -> dict[str, Source]:
    sources = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        name = _module_name(path)
        sources[name] = Source(name, str(path.relative_to(ROOT)), tree)
    return sources


SOURCES = _load_sources()
MODULES = frozenset(SOURCES)


# --- walking the tree ------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    """True for ``TYPE_CHECKING`` and ``typing.TYPE_CHECKING`` (any module alias)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those only under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch does run
            continue
        stack.extend(ast.iter_child_nodes(node))
    return out


def _base_of(source: Source, node: ast.ImportFrom) -> str:
    """The absolute module a ``from X import ...`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = source.module if source.is_package else source.module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imported_modules(source: Source, node: ast.AST) -> list[str]:
    """sam_geo modules an import statement loads (``from a import b``: ``a.b`` if a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = _base_of(source, node)
    if base != PACKAGE and not base.startswith(PACKAGE + "."):
        return []
    found = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in MODULES:
            found.append(submodule)
        elif base in MODULES:
            found.append(base)
    return found


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for source in SOURCES.values():
        for node in _runtime_nodes(source.tree):
            for target in _imported_modules(source, node):
                if target != source.module:
                    graph[source.module].add(target)
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _one_cycle(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """A shortest cycle through the first member, inside one strongly connected component."""
    inside = set(members)
    start = members[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return members  # not reached: a component always has a cycle through each member


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _module_aliases(source: Source) -> dict[str, str]:
    """Local names bound to sam_geo modules by the file's imports (any scope)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
                elif alias.name.split(".")[0] == PACKAGE:
                    aliases[PACKAGE] = PACKAGE
        elif isinstance(node, ast.ImportFrom):
            base = _base_of(source, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    return aliases


def _private_uses(source: Source) -> list[str]:
    """``path:line: what`` for every private name taken from another sam_geo module."""
    found = []
    for node in ast.walk(source.tree):
        if isinstance(node, ast.ImportFrom):
            base = _base_of(source, node)
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                for alias in node.names:
                    if _is_private(alias.name) and f"{base}.{alias.name}" not in MODULES:
                        found.append(f"{source.path}:{node.lineno}: from {base} import {alias.name}")
    aliases = _module_aliases(source)
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            value = _dotted(node.value)
            if value is None:
                continue
            head, _, rest = value.partition(".")
            module = aliases.get(head)
            resolved = f"{module}.{rest}" if module and rest else module
            if resolved in MODULES and resolved != source.module:
                found.append(f"{source.path}:{node.lineno}: {value}.{node.attr} (module {resolved})")
    return found


# --- the rules -------------------------------------------------------------------------


def test_sources_were_found() -> None:
    assert f"{PACKAGE}.errors" in MODULES and len(MODULES) > 10, sorted(MODULES)


def test_no_import_cycles() -> None:
    graph = _import_graph()
    cycles = [
        f"{' -> '.join(_one_cycle(graph, members))}  (component: {', '.join(members)})"
        for members in _strongly_connected(graph)
    ]
    assert not cycles, "import cycles among sam_geo modules:\n  " + "\n  ".join(cycles)


def test_no_private_names_across_modules() -> None:
    offenders = [use for source in SOURCES.values() for use in _private_uses(source)]
    assert not offenders, (
        "private names used across sam_geo modules (make them public, documented, or move "
        "them):\n  " + "\n  ".join(offenders)
    )


def test_no_function_longer_than_the_limit() -> None:
    offenders = []
    for source in SOURCES.values():
        for node in ast.walk(source.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{source.path}:{node.lineno}: {node.name} ({length} lines)")
    assert not offenders, (
        f"functions longer than {MAX_FUNCTION_LINES} lines (split them into named helpers):\n  "
        + "\n  ".join(sorted(offenders))
    )
