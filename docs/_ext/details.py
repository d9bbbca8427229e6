"""``.. details:: Summary``: content that a reader opens on demand.

Secondary tables (sweeps, every case of a benchmark, runs behind a summary)
stay on their page and in its search results, but folded under a one-line
summary, so that a page shows its answer first. The HTML is a native
``<details>`` element (no script); other builders show the content as it is.
"""

from __future__ import annotations

from html import escape

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


class details(nodes.General, nodes.Element):  # noqa: N801 (docutils names nodes in lower case)
    """A folded block; ``node["summary"]`` is the line shown while it is closed."""


class Details(SphinxDirective):
    """The ``details`` directive: one argument (the summary) and a body."""

    required_arguments = 1
    final_argument_whitespace = True
    has_content = True

    def run(self) -> list[nodes.Node]:
        node = details(summary=self.arguments[0])
        self.set_source_info(node)
        self.state.nested_parse(self.content, self.content_offset, node)
        return [node]


def _visit_html(translator, node: details) -> None:
    translator.body.append(
        f'<details class="folded"><summary>{escape(node["summary"])}</summary>\n'
    )


def _depart_html(translator, node: details) -> None:
    translator.body.append("</details>\n")


def _skip(translator, node: details) -> None:
    """Other builders: the content alone."""


def setup(app):
    """Register the node and the directive."""
    others = (_skip, _skip)
    app.add_node(
        details,
        html=(_visit_html, _depart_html),
        latex=others,
        text=others,
        man=others,
        texinfo=others,
    )
    app.add_directive("details", Details)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
