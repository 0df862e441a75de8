"""The documentation site builds with no warning, and its API reference lists every public name.

The build is Sphinx's own (``make docs`` runs the same command line) with warnings as errors, so a
broken cross-reference, a Markdown link to a missing page or a docstring Sphinx cannot read fails
here. The public names are read from the packages themselves (each package's ``__all__``, or its
modules' where it exports none), and looked up in the built site's object inventory (``objects.inv``,
the file intersphinx reads), not in the directive that wrote the pages.
"""

from __future__ import annotations

import importlib
import pkgutil
import posixpath
import re
from pathlib import Path

import pytest
from sphinx.cmd.build import build_main
from sphinx.util.inventory import InventoryFile

import pyro_moe

DOCS = Path(__file__).resolve().parents[1] / "docs"
PACKAGES = ("models", "guides", "inference", "diagnostics", "evaluation", "data", "experiments")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML site, built from scratch with warnings as errors (the warnings are in the failure)."""
    out = tmp_path_factory.mktemp("docs")
    warnings = out / "warnings.txt"
    options = ["-b", "html", "-W", "--keep-going", "-q", "-w", str(warnings), "-d", str(out / "doctrees")]
    status = build_main([*options, str(DOCS), str(out)])
    assert status == 0, warnings.read_text()
    return out


def public_names(package: str) -> set[str]:
    """The full names of ``package``'s public names: its ``__all__``, else its public submodules' (a
    subpackage with an ``__all__`` of its own standing for its modules)."""
    module = importlib.import_module(package)
    names = {f"{package}.{name}" for name in getattr(module, "__all__", None) or []}
    if names or not hasattr(module, "__path__"):
        return names
    for info in pkgutil.iter_modules(module.__path__, prefix=f"{package}."):
        if not info.name.rpartition(".")[2].startswith("_"):
            names |= public_names(info.name)
    return names


def documented(site: Path) -> set[str]:
    """Every Python object the site documents (its ``objects.inv``)."""
    with (site / "objects.inv").open("rb") as stream:
        inventory = InventoryFile.load(stream, "", posixpath.join)
    return {name for role, objects in inventory.items() if role.startswith("py:") for name in objects}


def test_the_site_builds_without_warnings(site: Path) -> None:
    for page in ("index", "getting-started", "experiments", "speed", "architecture", "api/index"):
        assert (site / f"{page}.html").is_file(), page
    assert len(list((site / "user-guide").glob("*.html"))) >= 12


def test_the_api_reference_lists_every_name_of_pyro_moe(site: Path) -> None:
    assert len(pyro_moe.__all__) > 30
    missing = {f"pyro_moe.{name}" for name in pyro_moe.__all__} - documented(site)
    assert not missing


@pytest.mark.parametrize("package", PACKAGES)
def test_the_api_reference_lists_every_public_name_of(package: str, site: Path) -> None:
    required = public_names(f"pyro_moe.{package}")
    assert len(required) >= 10
    assert not required - documented(site)


def test_the_readme_links_only_to_pages_that_exist() -> None:
    readme = DOCS.parent / "README.md"
    targets = re.findall(r"\]\((docs/[^)#]+)", readme.read_text())
    assert len(targets) >= 10
    assert [target for target in targets if not (DOCS.parent / target).is_file()] == []


def test_the_readme_stays_short() -> None:
    """The README is what a visitor needs; the manual is the docs (issue 27: under 250 lines)."""
    assert len((DOCS.parent / "README.md").read_text().splitlines()) < 250
