"""Lazy package exports (PEP 562): a package's names are imported from their modules on first use.

So importing a package, or any one of its modules, runs none of its other modules: `import apertis_core`
and the config modules stay free of torch, and a module may import a sibling package's leaf modules
without running that package's heavy ones.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, whose `exports` map each public name to
    the module that defines it, relative to the package. Each package names its table `_EXPORTS`:
    tests/test_import_graph.py reads it to see which module a `from package import name` runs."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # later look-ups find it without this call
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
