"""Sphinx configuration for tuckerlib + flora."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from numpydoc.docscrape import NumpyDocString

HERE = Path(__file__).parent
# The gallery's examples train torch models in this process: spinning OpenMP
# workers would slow them many times over on cores shared with other jobs.
# Set before anything loads torch's OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(HERE / "_ext"))

from offline_inventories import intersphinx_mapping as _offline_mapping  # noqa: E402

import flora  # noqa: E402
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
    # Serves MathJax from the built site (_static/mathjax), so formulas render offline.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "myst_parser",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
    "sphinx_gallery.gen_gallery",
    "site_checks",
    "details",
    "autolinks",
]

# The changelog (Markdown) names functions in code literals: link them.
autolinks_literal_pages = ["changelog"]

# The example gallery: every script in examples/ runs at build time and its
# page shows its code, output and figures. The scripts that take a launcher
# or options (distributed_flora.py runs under torchrun, make_digits_example.py
# rewrites the packaged data, train_with_trainer.py and flora_quickstart.py
# are the tested companions of their pages) stay out of it.
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "gallery",
    "filename_pattern": r"\.py$",
    "ignore_pattern": (
        r"(distributed_flora|make_digits_example|train_with_trainer|flora_quickstart)\.py$"
    ),
    "within_subsection_order": "gallery_order.ExampleOrder",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "show_signature": False,
    "write_computation_times": False,
    "remove_config_comments": True,
}

plot_include_source = True
plot_html_show_formats = False
plot_html_show_source_link = False
plot_formats = [("png", 100)]

autosummary_generate = True


def _public_names() -> dict[str, str]:
    """Map ``module.name`` to the public name of each object a package exports.

    The module pages (``docs/_templates/autosummary/module.rst``) link such an
    object to its one page, ``flora.save_adapter``, instead of documenting
    ``flora.io.save_adapter`` a second time. The template asks only about the
    names a module defines or documents itself.
    """
    found = {}
    for package in (flora, tuckerlib):
        prefix = package.__name__ + "."
        modules = [(n, m) for n, m in list(sys.modules.items()) if n.startswith(prefix)]
        for name in package.__all__:
            public = getattr(package, name)
            for module_name, module in modules:
                if getattr(module, name, None) is public:
                    found[f"{module_name}.{name}"] = prefix + name
    return found


autosummary_context = {"public_names": _public_names()}
autodoc_typehints = "none"
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

intersphinx_mapping = _offline_mapping(HERE / "_build" / "inventories")

nitpicky = True
nitpick_ignore_regex = [
    # numpydoc renders parameter types as text; these are type words, not objects.
    (r"py:class", r"(array|array-like|optional|callable|module|path-like|None)"),
]

# Text that may stay on a page although a site check flags it, by page
# (docs/_ext/site_checks.py; an entry whose text has left its page is an error).
site_checks_allow: dict[str, list[str]] = {
    # CHANGELOG.md is written in Markdown, where math is code; the entries of
    # earlier releases keep it.
    "changelog": ["'‖x‖²'", "'R_n <= min(I_n, prod_{m != n} R_m)'"],
}
# Searches for the names readers type, and the public name each must rank first.
site_checks_search = {
    "merge": "flora.merge",
    "save adapter": "flora.save_adapter",
    "inject": "flora.inject",
    "sthosvd": "tuckerlib.sthosvd",
}

# Pages left out of the search index. getting_started.rst includes the
# Quicktour's gallery page, so only that copy is searched (site_checks fails
# on an indexed page whose prose another indexed page repeats).
not_searched = {"gallery/quicktour"}

# The changelog is CHANGELOG.md at the repository root, included by changelog.rst.
myst_heading_anchors = 2

# Copy the code of examples without prompts and output.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True

# Package-level public names rank first in the search (see the file's comment).
html_search_scorer = str(HERE / "_ext" / "search_scorer.js")

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "pydata_sphinx_theme"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
# The theme's colour mode on a first visit (without it the theme script logs
# "Got invalid theme mode" and falls back to auto).
html_context = {"default_mode": "auto"}
html_css_files = ["custom.css"]
html_title = f"tuckerlib + flora {version}"
html_short_title = "tuckerlib + flora"
html_theme_options = {
    "navigation_with_keys": False,
    "logo": {"text": "tuckerlib + flora"},
    "navbar_start": ["navbar-logo", "navbar-version"],
    "navbar_align": "left",
    # The six sections of the root toctree all fit: nothing hides under "More".
    "header_links_before_dropdown": 7,
    "show_toc_level": 2,
    # The experiment pages of the evidence give their width to its 10-column
    # tables (no "On this page": five short sections each).
    "secondary_sidebar_items": {
        "**": ["page-toc", "sourcelink"],
        **{f"flora_vs_lora_{study}": [] for study in ("digits", "onet", "minilm", "extract")},
    },
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
# Pages without siblings get no primary sidebar (it would be an empty "Section Navigation").
html_sidebars = {"index": [], "changelog": []}


def _skip_type_aliases(app, what, name, obj, skip, options):
    """Leave class attributes that merely hold a type (``base_type = nn.Conv2d``) undocumented.

    A class under its own name is kept: autosummary asks about a module's
    classes with ``what="class"`` too.
    """
    if what == "class" and isinstance(obj, type) and obj.__name__ != name:
        return True
    return None


def _inherit_attributes(app, what, name, obj, options, lines):
    """Give a class without an Attributes section the one of its nearest documented base.

    Inherited methods are listed by the class template; instance attributes
    (``ranks``, ``core``) live in a base class's docstring and would be lost.
    """
    if what != "class" or "Attributes" in (line.strip() for line in lines):
        return
    for base in inspect.getmro(obj)[1:]:
        if base.__module__.split(".")[0] not in {"flora", "tuckerlib"}:
            continue
        attributes = NumpyDocString(inspect.getdoc(base) or "")["Attributes"]
        if attributes:
            lines += ["", "Attributes", "----------"]
            for attribute in attributes:
                typed = f"{attribute.name} : {attribute.type}"
                lines.append(typed if attribute.type else attribute.name)
                lines += [f"    {text}" for text in attribute.desc]
            return


def _leave_out_of_search(app, doctree) -> None:
    """Mark a page of ``not_searched`` with Sphinx's ``nosearch`` metadata."""
    if app.env.docname in not_searched:
        app.env.metadata[app.env.docname]["nosearch"] = ""


def setup(app):
    app.connect("autodoc-skip-member", _skip_type_aliases)
    # After Sphinx's metadata collector (priority 500), which resets the page's metadata.
    app.connect("doctree-read", _leave_out_of_search, priority=800)
    # Before numpydoc (priority 500) turns the sections into reST.
    app.connect("autodoc-process-docstring", _inherit_attributes, priority=400)
