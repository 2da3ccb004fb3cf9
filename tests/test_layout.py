"""The package's layout: no import cycles between modules, and floors in order.

Why a test: a cycle ties modules that should stand in order (the data path
reads request -> prompt -> tokens -> trie -> cache model / routing -> upstream
-> tracking -> analytics), and each later change makes one easier to add and
harder to untie. The walk reads the source with ``ast`` and counts every
import, also those inside functions and ``if TYPE_CHECKING:`` blocks: a lazy
or typing-only import is still a dependency, only a hidden one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "kvern"

# Import floors, lowest first: a module may import its own floor and those
# below it, never one above. Top-level names are packages or modules of kvern.
FLOORS: list[set[str]] = [
    {"config", "errors"},  # settings and the error tree everything shares
    # pure tries, the store, HTTP to backends, bodies; why requests missed (pure)
    {"trie", "analytics", "upstream", "prompt", "diagnosis", "request_body"},
    {"tokenize", "cache_models"},  # prompt -> ids; models of each backend's own KV cache
    {"routing"},  # presence, load, health and the choice of upstream
    {"tracking", "parity"},  # the tracking thread; checks against the backend's tokenizer
    {"metrics"},  # Prometheus instruments fed by rows, and what the other parts report
    # handlers, app, CLI, doctor, the offline analysis of a log
    # and the engine, an inference server of its own that needs only the floors below
    {"services", "routes", "app", "serving", "__main__", "doctor", "cli_logs", "analyze", "engine"},
]
TOP_LEVEL = {"__init__"}  # kvern/__init__.py: the version, importable from any floor


def module_name(path: Path, root: Path) -> str:
    """``kvern/trie/radix.py`` -> ``kvern.trie.radix``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvern modules ``name`` imports; ``from pkg import sub`` counts as ``pkg.sub``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: Iterable[str]
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # ``import kvern.a.b`` depends on kvern.a.b, the longest known name.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = package_modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def floor_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"{module}: top-level name {top!r} is on no floor of FLOORS")


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        if module == "kvern" or module.split(".")[1] in TOP_LEVEL:
            continue
        here = floor_of(module)
        for target in sorted(targets):
            if target == "kvern":
                continue
            if floor_of(target) > here:
                out.append(f"{module} (floor {here}) imports {target} (floor {floor_of(target)})")
    return out


def test_no_import_cycle_between_modules() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_imports_a_higher_floor() -> None:
    violations = floor_violations(import_graph())
    assert violations == [], "\n".join(violations)


def test_every_top_level_name_stands_on_a_floor() -> None:
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE_DIR.iterdir()}
    tops = {t for t in tops if not t.startswith((".", "__pycache__")) and t not in TOP_LEVEL}
    placed = set().union(*FLOORS)
    assert tops - placed == set(), "add these to FLOORS"
    assert placed - tops == set(), "FLOORS names what kvern/ no longer has"


# -- the checker itself ------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "kvern"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_a_cycle_through_a_lazy_or_typing_only_import_is_found(tmp_path: Path) -> None:
    pkg = write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from kvern.b import f\n",
            "b.py": "def f():\n    from kvern.c import g\n",
            "c.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from kvern import a\n",
            "d.py": "from kvern.a import x\n",
        },
    )
    assert cycles(import_graph(pkg)) == [["kvern.a", "kvern.b", "kvern.c"]]


def test_from_a_package_import_a_submodule_depends_on_the_submodule(tmp_path: Path) -> None:
    pkg = write(
        tmp_path,
        {
            "__init__.py": "",
            "trie/__init__.py": "from kvern.trie.radix import RadixTrie\n",
            "trie/radix.py": "from kvern.trie import report\n",
            "trie/report.py": "from . import radix\n",
            "other.py": "import kvern.trie.radix\nfrom kvern.trie import RadixTrie\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["kvern.trie.radix"] == {"kvern.trie.report"}
    assert graph["kvern.trie.report"] == {"kvern.trie.radix"}
    assert graph["kvern.other"] == {"kvern.trie", "kvern.trie.radix"}
    assert cycles(graph) == [["kvern.trie.radix", "kvern.trie.report"]]


@pytest.mark.parametrize(
    ("module", "target", "ok"),
    [("kvern.trie.radix", "kvern.config", True), ("kvern.trie.radix", "kvern.routing.x", False)],
)
def test_a_lower_floor_importing_a_higher_one_is_reported(
    module: str, target: str, ok: bool
) -> None:
    graph = {module: {target}, target: set()}
    assert (floor_violations(graph) == []) is ok
