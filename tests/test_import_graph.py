"""apertis_core's imports: no module imports a module that imports it back, `import apertis_core` loads no
torch, and every lazily exported name resolves.

The graph has one node per module (a package is its __init__.py) and an edge M -> T for every import
statement anywhere in M: at the top, inside functions and under TYPE_CHECKING alike, because an import
hidden in a function is still a dependency, only a later one. Relative imports are resolved against M's
package. How Python executes an import decides the rest:

- `import a.b.c` and `from a.b.c import x` run a/__init__, a/b/__init__ and a/b/c, so M depends on all
  three, except on M's own packages: those were started before M ran (a package's __init__ importing its
  own modules is how packages are built, not a circle).
- `from P import name` also depends on P.name when that is a module, and, when P exports `name` lazily,
  on the module P's `_EXPORTS` table names for it: that is the module the import runs.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from importlib.util import resolve_name
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAZY_PACKAGES = ["apertis_core", "apertis_core.data", "apertis_core.model", "apertis_core.training"]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `package` (a folder in `root`)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def lazy_table(tree: ast.Module, package: str) -> dict[str, str]:
    """A package's `_EXPORTS = {name: module relative to the package}`, resolved; {} when it has none."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return {name: resolve_name(module, package) for name, module in ast.literal_eval(node.value).items()}
    return {}


def import_graph(root: Path = ROOT, package: str = "apertis_core") -> dict[str, set[str]]:
    files = module_files(root, package)
    trees = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in files.items()}
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    lazy = {name: lazy_table(trees[name], name) for name in packages}
    graph = {}
    for name, tree in trees.items():
        home = name if name in packages else name.rpartition(".")[0]
        started = {name, *ancestors(name)}
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve_name("." * node.level + (node.module or ""), home)
                targets = [base]
                for alias in node.names:
                    if f"{base}.{alias.name}" in files:
                        targets.append(f"{base}.{alias.name}")
                    elif alias.name in lazy.get(base, {}):
                        targets.append(lazy[base][alias.name])
            else:
                continue
            for target in targets:
                edges |= {m for m in (target, *ancestors(target)) if m in files and m not in started}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search; grey nodes are on the current path)."""
    grey: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        grey.append(node)
        for target in sorted(graph[node]):
            if target in grey:
                return grey[grey.index(target) :] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        grey.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_a_module_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_follows_how_python_runs_imports(tmp_path):
    files = {
        "__init__.py": "from .lazy import lazy_exports\n_EXPORTS = {'Model': '.model.core'}\n",
        "lazy.py": "",
        "model/__init__.py": "",
        "model/core.py": "from ..vision import encoder\n",
        "model/layers.py": "import pkg.model.core\n",
        "vision/__init__.py": "",
        "vision/encoder.py": "def build():\n    from .. import Model\n    from ..model import layers\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg"] == {"pkg.lazy"}  # its lazy exports run only when asked for, by a `from pkg import`
    assert graph["pkg.model.core"] == {"pkg.vision", "pkg.vision.encoder"}  # the package's __init__ runs first
    assert graph["pkg.model.layers"] == {"pkg.model.core"}  # its own packages were started before it
    # Inside a function: the lazily exported name's module, and a submodule with the package that holds it.
    assert graph["pkg.vision.encoder"] == {"pkg.model", "pkg.model.core", "pkg.model.layers"}
    assert find_cycle(graph) == ["pkg.model.core", "pkg.vision.encoder", "pkg.model.core"]


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_apertis_core_and_its_config_modules_loads_no_torch():
    code = (
        "import sys, apertis_core, apertis_core.filenames, apertis_core.model.config, apertis_core.data.config, "
        "apertis_core.training.config; print(sorted(m for m in ('torch', 'PIL', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazy_export_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        module.nonexistent  # noqa: B018
