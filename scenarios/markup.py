"""The light RST of scenario stories, as plain text (terminal) and as safe HTML (the report).

What the stories use: paragraphs (blank lines between), ``- `` list items with indented
continuation lines, labelled paragraphs (``Story:``, ``Expected verdict:``, ...) at a line start,
inline ````literal````, ```literal```, ``*emphasis*`` and ``**strong**``. Everything else is text:
the HTML is escaped first and markup is applied to the escaped text, so nothing in a story can
inject tags.
"""

from __future__ import annotations

import html
import re

_LABEL = re.compile(r"^((?:Story|Expected verdict|What keytrio's verifier does)(?: \([^)]*\))?):\s*")
_ITEM = re.compile(r"^[-*] ")
_INLINE = (
    (re.compile(r"``(.+?)``"), r"<code>\1</code>"),
    (re.compile(r"(?<![\w`])`([^`]+?)`(?![\w`])"), r"<code>\1</code>"),
    (re.compile(r"(?<![\w*])\*\*(\S(?:.*?\S)??)\*\*(?![\w*])"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![\w*])\*(\S(?:.*?\S)??)\*(?![\w*])"), r"<em>\1</em>"),
)
_PLAIN = (
    (re.compile(r"``(.+?)``"), r"\1"),
    (re.compile(r"(?<![\w`])`([^`]+?)`(?![\w`])"), r"\1"),
    (re.compile(r"(?<![\w*])\*\*(\S(?:.*?\S)??)\*\*(?![\w*])"), r"\1"),
    (re.compile(r"(?<![\w*])\*(\S(?:.*?\S)??)\*(?![\w*])"), r"\1"),
)


def first_paragraph(text: str) -> str:
    """The first paragraph of ``text`` (up to a blank line), its lines joined by single spaces."""
    para = text.strip().split("\n\n", 1)[0]
    return " ".join(para.split())


def plain(text: str) -> str:
    """``text`` without inline markup (for a terminal)."""
    for pattern, repl in _PLAIN:
        text = pattern.sub(repl, text)
    return text


def inline_html(text: str) -> str:
    """One run of text as HTML: escaped, then inline markup; ``->`` becomes an arrow."""
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out.replace(" -&gt; ", " \u2192 ")


def _blocks(text: str) -> list[tuple[str, str | None, list[str]]]:
    """(kind, label, lines) blocks: kind "p" (a paragraph) or "li" (a list item)."""
    blocks: list[tuple[str, str | None, list[str]]] = []
    fresh = True  # the next line starts a block
    for raw in text.strip().splitlines():
        line = raw.rstrip()
        if not line.strip():
            fresh = True
            continue
        if _ITEM.match(line):
            blocks.append(("li", None, [line[2:].strip()]))
        elif (m := _LABEL.match(line)) is not None:
            blocks.append(("p", m.group(1), [line[m.end():]]))
        elif fresh or (blocks and blocks[-1][0] == "li" and not raw.startswith(" ")):
            blocks.append(("p", None, [line.strip()]))
        else:
            blocks[-1][2].append(line.strip())
        fresh = False
    return blocks


def to_html(text: str) -> str:
    """A story as HTML paragraphs and lists (every piece of text escaped)."""
    parts: list[str] = []
    in_list = False
    for kind, label, lines in _blocks(text):
        body = inline_html(" ".join(line for line in lines if line))
        if kind == "li":
            if not in_list:
                parts.append("<ul>")
                in_list = True
            parts.append(f"<li>{body}</li>")
            continue
        if in_list:
            parts.append("</ul>")
            in_list = False
        head = f"<strong>{html.escape(label)}:</strong> " if label else ""
        parts.append(f"<p>{head}{body}</p>")
    if in_list:
        parts.append("</ul>")
    return "".join(parts)
