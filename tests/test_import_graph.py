"""The package's layout is its architecture (issue 22): the subpackages under src/softprompt are
layers, and a module imports only from its own subpackage or from a layer below it, so that the
tree read top-down is the order in which the parts depend on each other. No module imports, even
lazily inside a function, anything that imports it back.

The graph is read from the source with `ast`: every `import` and `from ... import`, at module
level or inside a function (a lazy import is still a dependency) or under TYPE_CHECKING, relative
ones resolved against the importing module's package. Modules named in strings (the command
table's rows, the package's lazy names) are not imports and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "softprompt"
TOP = ""  # the modules directly in src/softprompt: the command line, the Python API, the demo

# Lowest first. A layer may hold several subpackages that import nothing from each other.
LAYERS = [
    ("core",),              # errors and file helpers, the settings, the init table, the Prompt protocol
    ("base", "data"),       # the frozen base model; rows to tokenised examples
    ("forward",),           # the prompt-aware forward pass and the rank-classification scorer
    ("prompts",),           # soft and deep prompts and their files (their keys come from the forward pass)
    ("generation",),        # decoding engines and the generate command
    ("evaluation",),        # scoring, ensembles, lm-evaluation-harness
    ("training", "serve"),  # the training loop (it evaluates) and compare; the HTTP server
    (TOP,),
]
MAX_LAYERS = 9


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module under root (the package's folder), by dotted name; a package by its own name."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, lazily or not (its own ancestors left out: a
    submodule's package is loaded first by Python, not by the submodule's choice)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` imports the module mod; `from mod import name` imports mod.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if not state.get(t) and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if not state.get(m) and (cycle := visit(m)):
            return cycle
    return []


def subpackages(root: Path) -> set[str]:
    return {p.parent.name for p in root.glob("*/__init__.py")}


def upward_imports(graph: dict[str, set[str]], where: dict[str, str], layers: list[tuple[str, ...]]) -> list[str]:
    """Each import that crosses subpackages without going down the layers, in words; `where`
    gives each module's subpackage."""
    level = {sub: i for i, subs in enumerate(layers) for sub in subs}
    bad = []
    for m in sorted(graph):
        for t in sorted(graph[m]):
            a, b = where[m], where[t]
            if a != b and level[a] <= level[b]:
                bad.append(f"{m} ({a or 'top'}, layer {level[a]}) imports {t} ({b or 'top'}, layer {level[b]})")
    return bad


def check(root: Path, layers: list[tuple[str, ...]], package: str = PACKAGE) -> tuple[list[str], list[str]]:
    """(a cycle or [], the upward imports) of the package whose folder is root."""
    modules = module_names(root, package)
    # softprompt.forward.hidden -> "forward"; softprompt.cli and softprompt itself -> TOP
    where = {name: (path.relative_to(root).parts[0] if path.parent != root else TOP) for name, path in modules.items()}
    graph = import_graph(root, package)
    return find_cycle(graph), upward_imports(graph, where, layers)


SRC = ROOT / "src" / PACKAGE


def test_every_subpackage_has_one_layer_and_the_layers_are_few():
    listed = [sub for subs in LAYERS for sub in subs]
    assert len(listed) == len(set(listed)), "a subpackage is listed twice"
    assert set(listed) - {TOP} == subpackages(SRC), "every subpackage goes into LAYERS, and only those"
    assert len(LAYERS) <= MAX_LAYERS


def test_no_module_imports_itself_back():
    cycle, _ = check(SRC, LAYERS)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_imports_between_subpackages_point_down_the_layers():
    _, upward = check(SRC, LAYERS)
    assert not upward, "imports that do not point down LAYERS:\n" + "\n".join(upward)


def test_the_check_finds_an_upward_import_a_sideways_one_and_a_cycle(tmp_path):
    # A package shaped like softprompt, with one of each fault; relative, absolute and lazy imports.
    files = {
        "__init__.py": "",
        "cli.py": "from .low.a import f\n",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from ..high.b import g\n",           # up, lazily
        "high/__init__.py": "",
        "high/b.py": "from pkg.low import a\nfrom . import c\n",         # down: fine
        "high/c.py": "import pkg.high.b\n",                               # b -> c -> b: a cycle
        "side/__init__.py": "",
        "side/d.py": "from ..high.b import g\n",                          # sideways, same layer
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    cycle, upward = check(tmp_path, [("low",), ("high", "side"), (TOP,)], package="pkg")
    assert cycle in (["pkg.high.b", "pkg.high.c", "pkg.high.b"], ["pkg.high.c", "pkg.high.b", "pkg.high.c"])
    assert upward == ["pkg.low.a (low, layer 0) imports pkg.high.b (high, layer 1)",
                      "pkg.side.d (side, layer 1) imports pkg.high.b (high, layer 1)"]
    _, upward = check(tmp_path, [("low",), ("high",), ("side",), (TOP,)], package="pkg")
    assert upward == ["pkg.low.a (low, layer 0) imports pkg.high.b (high, layer 1)"]
