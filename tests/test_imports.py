"""The import graph of the package: no module imports one that imports it back.

A circle makes the import order matter (a name is missing while its module is half run) and hides which
module is the lower one. ``ccsr.roles`` is the ground floor of the configuration: ``ccsr.config`` checks
against it, and ``ccsr.backends``, which builds backends, sits above both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ccsr

PACKAGE = Path(ccsr.__file__).parent


def _modules() -> dict[str, Path]:
    return {
        ".".join(("ccsr", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }


def _imports(body: list[ast.stmt], module_level: bool) -> set[str]:
    """The absolute module names imported in ``body``: with ``module_level``, the statements run on import
    (not ``if TYPE_CHECKING:`` blocks: a helper module may name its owner's type); otherwise every import,
    function bodies and type-only imports too."""
    found: set[str] = set()
    for node in body if module_level else [n for stmt in body for n in ast.walk(stmt)]:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # ``from ccsr import x``
        elif module_level and isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            continue
        elif module_level and isinstance(node, (ast.If, ast.Try)):
            blocks = [node.body, node.orelse, *(h.body for h in getattr(node, "handlers", []))]
            found.update(*(_imports(block, module_level) for block in blocks))
    return found


def _graph(module_level: bool, among: set[str] | None = None) -> dict[str, set[str]]:
    modules = _modules()
    among = among or set(modules)
    return {
        name: {t for t in _imports(ast.parse(modules[name].read_text()).body, module_level) if t in among}
        - {name}
        for name in among
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports in ``graph`` (``[a, b, a]``), or None."""
    state: dict[str, str] = {}  # "open" while its imports are being followed, then "done"

    def visit(chain: list[str]) -> list[str] | None:  # ``chain``: the open modules, each importing the next
        state[chain[-1]] = "open"
        for target in sorted(graph[chain[-1]]):
            if state.get(target) == "open":
                return [*chain[chain.index(target) :], target]
            if target not in state and (found := visit([*chain, target])):
                return found
        state[chain[-1]] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit([node])):
            return found
    return None


def test_module_level_imports_have_no_cycle():
    assert _cycle(_graph(module_level=True)) is None


def test_the_config_floor_imports_nothing_from_above_even_lazily():
    floor = {"ccsr.roles", "ccsr.config", "ccsr.devices", "ccsr.backends"}
    graph = _graph(module_level=False, among=floor)
    assert _cycle(graph) is None
    assert graph["ccsr.roles"] == set(), "ccsr.roles imports nothing of ccsr"
