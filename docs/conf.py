"""Sphinx configuration for tuckerlib + flora."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))

from offline_inventories import intersphinx_mapping as _offline_mapping  # noqa: E402

import tuckerlib  # noqa: E402

project = "tuckerlib"
author = "tuckerlib developers"
copyright = "2026, tuckerlib developers"
release = tuckerlib.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
]

plot_include_source = True
plot_html_show_formats = False
plot_html_show_source_link = False

autosummary_generate = True
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

intersphinx_mapping = _offline_mapping(HERE / "_build" / "inventories")

nitpicky = True
nitpick_ignore_regex = [
    # numpydoc renders parameter types as text; these are type words, not objects.
    (r"py:class", r"(array|array-like|optional|callable|module|path-like|None)"),
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "pydata_sphinx_theme"
html_static_path = ["_static"]
html_title = "tuckerlib + flora"
html_theme_options = {"navigation_with_keys": False}
