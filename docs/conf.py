"""Sphinx configuration of the pyro-moe documentation (``make docs`` builds it into ``docs/_build``).

The pages are Markdown (MyST); the API reference is generated from the docstrings of every public
name (each package's ``__all__``, or its submodules' where the package exports none) by the
``public_api`` extension in ``_ext``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "pyro-moe"
author = "the pyro-moe authors"
copyright = "2026, the pyro-moe authors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
    "public_api",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "pyro-moe"
html_static_path: list[str] = []
