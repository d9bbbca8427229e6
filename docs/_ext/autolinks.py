"""Links that pages written elsewhere cannot spell as roles.

* ``arXiv:2405.14739`` in the text of any page becomes a link to the paper's
  abstract on arxiv.org.
* On the pages of ``autolinks_literal_pages`` (the changelog, written in
  Markdown at the repository root), a code literal that names a documented
  object (``merge``, ``flora.save_adapter``, ``sthosvd()``) becomes a link
  to its page, as ``:func:`` would make it: ``flora.X`` or ``tuckerlib.X``
  when exactly one of them is documented.
"""

from __future__ import annotations

import re

from docutils import nodes

ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")
NAME = re.compile(r"[A-Za-z_][\w.]*")
PACKAGES = ("flora", "tuckerlib")
SKIPPED_PARENTS = (nodes.reference, nodes.literal, nodes.literal_block, nodes.raw)


def _arxiv_links(doctree: nodes.document) -> None:
    for text in list(doctree.findall(nodes.Text)):
        if not ARXIV.search(text) or isinstance(text.parent, SKIPPED_PARENTS):
            continue
        pieces, last = [], 0
        for match in ARXIV.finditer(text):
            pieces.append(nodes.Text(text[last : match.start()]))
            url = f"https://arxiv.org/abs/{match.group(1)}"
            pieces.append(nodes.reference(match.group(0), match.group(0), refuri=url))
            last = match.end()
        pieces.append(nodes.Text(text[last:]))
        text.parent.replace(text, [piece for piece in pieces if piece.astext()])


def _object(objects: dict, literal: str) -> tuple[str, object] | None:
    """The documented object a code literal names, if exactly one matches."""
    name = literal.removesuffix("()")
    if not NAME.fullmatch(name):
        return None
    found = [full for full in (name, *(f"{p}.{name}" for p in PACKAGES)) if full in objects]
    return (found[0], objects[found[0]]) if len(found) == 1 else None


def _literal_links(app, doctree: nodes.document, docname: str) -> None:
    objects = app.env.domains["py"].objects
    for literal in list(doctree.findall(nodes.literal)):
        if isinstance(literal.parent, SKIPPED_PARENTS):
            continue
        found = _object(objects, literal.astext())
        if found is None:
            continue
        fullname, entry = found
        uri = app.builder.get_relative_uri(docname, entry.docname) + "#" + entry.node_id
        reference = nodes.reference("", "", internal=True, refuri=uri, reftitle=fullname)
        reference += literal.deepcopy()
        literal.parent.replace(literal, reference)


def _on_doctree_resolved(app, doctree: nodes.document, docname: str) -> None:
    _arxiv_links(doctree)
    if docname in app.config.autolinks_literal_pages:
        _literal_links(app, doctree, docname)


def setup(app):
    """Register the transform and ``autolinks_literal_pages``."""
    app.add_config_value("autolinks_literal_pages", [], "env", types=frozenset({list}))
    app.connect("doctree-resolved", _on_doctree_resolved)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
