"""Docs-build extension: render the docstrings' reST roles as Markdown.

The package's docstrings use Sphinx roles (``:math:`x```, ``:class:`Name```), which
are readable in ``help()`` but print as literal text in a Markdown site. This griffe
extension rewrites them when mkdocstrings loads the package: ``:math:`...``` becomes
inline maths for arithmatex (``\\(...\\)``), the cross-reference roles become code.
"""

from __future__ import annotations

import re

import griffe

_MATH = re.compile(r":math:`([^`]+)`")
_XREF = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


_DIRECTIVE = re.compile(r"^(\s*)\.\. (math|code-block)::\s*(\S.*)?$")


def _directives(text: str) -> str:
    """``.. math::`` blocks as display maths, ``.. code-block::`` as fenced code."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent, kind, rest = m.group(1), m.group(2), (m.group(3) or "").strip()
        body, i = [], i + 1
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip() if kind == "math" else lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        trailing = len(lines[i - 1].strip()) == 0 if i > 0 else False
        if kind == "math":
            # one display per blank-line-separated paragraph of the directive
            block = [r"\["] + ([rest] if rest else [])
            for b in body:
                block.extend([r"\]", "", r"\["] if not b else [b])
            block.append(r"\]")
        else:
            code = body
            cut = min((len(b) - len(b.lstrip()) for b in code if b.strip()), default=0)
            block = ["```" + rest, *[b[cut:] for b in code], "```"]
        out.extend(indent + b for b in block)
        if trailing:
            out.append("")
    return "\n".join(out)


def markdown_roles(text: str) -> str:
    """The docstring ``text`` with its reST roles and directives written as Markdown."""
    text = _directives(text)
    text = _MATH.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
    return _XREF.sub(lambda m: "`" + m.group(1) + "`", text)


class RstRoles(griffe.Extension):
    """Rewrite reST roles in every loaded docstring (see the module docstring)."""

    def on_object(self, *, obj, **kwargs) -> None:  # noqa: D102 - griffe hook
        if obj.docstring is not None:
            obj.docstring.value = markdown_roles(obj.docstring.value)

    def on_package(self, *, pkg, **kwargs) -> None:  # noqa: D102 - the root is not an "object"
        self.on_object(obj=pkg)
