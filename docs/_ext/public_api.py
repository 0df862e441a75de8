"""The ``public-api`` directive: the API reference of a package, from ``__all__``.

``.. public-api:: pyro_moe.inference`` documents the names in the package's ``__all__``; a package
whose ``__all__`` is empty or missing is documented through its submodules' ``__all__`` (found by
walking the package, so that splitting or adding a module needs no change to the docs).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from types import ModuleType

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def exports(module: ModuleType) -> list[str]:
    """The public names of ``module``: its ``__all__`` (empty when it has none)."""
    return list(getattr(module, "__all__", None) or [])


def documented_modules(name: str) -> list[ModuleType]:
    """``name`` itself when it exports names, else its public submodules that do.

    The search descends into a subpackage only where the subpackage exports nothing itself: a package
    with an ``__all__`` stands for its modules (as ``pyro_moe.models`` does).
    """
    package = importlib.import_module(name)
    if exports(package) or not hasattr(package, "__path__"):
        return [package]
    found = []
    for info in pkgutil.iter_modules(package.__path__, prefix=f"{name}."):
        if not info.name.rpartition(".")[2].startswith("_"):
            found += [module for module in documented_modules(info.name) if exports(module)]
    return sorted(found, key=lambda module: module.__name__)


def attribute_docs(module_name: str) -> dict[str, list[str]]:
    """The docstrings of ``module_name``'s module-level names (``NAME = ...`` then a string)."""
    try:
        docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except PycodeError:
        return {}
    return {name: list(lines) for (scope, name), lines in docs.items() if scope == ""}


def data_directives(module: ModuleType) -> list[str]:
    """``py:data`` entries for the exported constants autodoc leaves out.

    Autodoc documents a module's data only where that module's source gives them a docstring; a
    constant re-exported from another module (``pyro_moe.FAMILIES``) or written without one is
    skipped. Each gets an entry here, with the docstring of the module that defines it if it has one,
    else its type (and its value when short).
    """
    own = attribute_docs(module.__name__)
    lines: list[str] = []
    for name in exports(module):
        value = getattr(module, name)
        if name in own or inspect.isclass(value) or inspect.isroutine(value) or inspect.ismodule(value):
            continue
        doc: list[str] = []
        for other in sorted(sys.modules):
            source = sys.modules[other]
            if other.startswith("pyro_moe.") and getattr(source, name, None) is value:
                doc = attribute_docs(other).get(name, [])
                if doc:
                    break
        kind = type(value)
        qualified = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        lines += [f".. py:data:: {name}", f"   :type: {qualified}"]
        if len(repr(value)) <= 80:
            lines.append(f"   :value: {value!r}")
        lines += ["", *(f"   {line}" for line in doc), ""]
    return lines


class PublicAPI(SphinxDirective):
    """Autodoc of a package's public names, one section per documented module."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        modules = documented_modules(self.arguments[0])
        lines: list[str] = []
        for module in modules:
            if module.__name__ != self.arguments[0]:
                title = f"``{module.__name__}``"
                lines += [title, "-" * len(title), ""]
            lines += [f".. automodule:: {module.__name__}", "   :members:", "   :undoc-members:", ""]
            lines += data_directives(module)
        container = nodes.section() if len(modules) > 1 else nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=f"public-api {self.arguments[0]}"), container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("public-api", PublicAPI)
    return {"parallel_read_safe": True, "version": "1"}
