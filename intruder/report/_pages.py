"""A report as a list of blocks, rendered twice: a self-contained HTML page and a Markdown file.

Both renderings come from the same blocks, so they hold the same content. Text may use `code` spans.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Notice:
    """A warning the reader must see: different bases, a missing metrics file, a figure left out."""

    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list]
    caption: str = ""


@dataclass
class Image:
    path: str  # relative to the report's directory, e.g. "figures/run-a-intruder-map.png"
    caption: str
    width: float | None = None  # CSS pixels (1/96 in): the figure's size in print, so fonts match across figures


@dataclass
class Gallery:
    """Figures shown side by side where the page is wide enough."""

    images: list[Image] = field(default_factory=list)


@dataclass
class Code:
    text: str
    language: str = ""


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       max-width: 1160px; margin: 2em auto; padding: 0 1.2em; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
h2, h3 { margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.4em 0 1.4em; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 1.2em;
           grid-auto-flow: dense; }
.gallery figure.wide { grid-column: 1 / -1; } td:first-child { white-space: nowrap; }
figure { margin: 0.6em 0 1.2em; } figure img { max-width: 100%; height: auto; border: 1px solid #e5e5e5; }
figcaption { font-size: 0.86em; color: #444; margin-top: 0.3em; }
.notice { background: #fff6e0; border-left: 4px solid #E69F00; padding: 8px 12px; margin: 0.8em 0; }
pre { background: #f6f6f6; padding: 8px 10px; overflow-x: auto; font-size: 0.84em; }
code { font-size: 0.92em; } details > summary { cursor: pointer; font-weight: 600; margin: 0.4em 0; }
"""
_FOLD_ROWS = 24  # longer HTML tables start folded
_COLUMN = 540  # CSS pixels of a gallery column: a wider figure takes a row of its own


def render_html(title: str, blocks: list, root: Path) -> str:
    """One HTML page; every image is read from `root / image.path` and embedded as a PNG data URI."""
    body = "\n".join(_html_block(b, root) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def render_markdown(title: str, blocks: list) -> str:
    """The same content as Markdown; images are referenced by their relative paths."""
    return f"# {title}\n\n" + "\n\n".join(_md_block(b) for b in blocks) + "\n"


def _html_block(block, root: Path) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_inline(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Notice):
        return f'<div class="notice"><strong>Note:</strong> {_inline(block.text)}</div>'
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        data = base64.b64encode((root / block.path).read_bytes()).decode("ascii")
        wide = ' class="wide"' if block.width and block.width > _COLUMN else ""
        width = f' style="width: {block.width:.0f}px"' if block.width else ""
        return (f'<figure{wide}><img src="data:image/png;base64,{data}"{width} alt="{html.escape(block.caption)}">'
                f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
    if isinstance(block, Gallery):
        return '<div class="gallery">' + "".join(_html_block(i, root) for i in block.images) + "</div>"
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(_html_cell(v) for v in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{_inline(table.caption)}</caption>" if table.caption else ""
    text = f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if len(table.rows) > _FOLD_ROWS:
        summary = html.escape(f"{table.caption or 'table'} ({len(table.rows)} rows)")
        return f"<details><summary>{summary}</summary>{text}</details>"
    return text


def _html_cell(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_fmt(value)}</td>' if numeric else f"<td>{html.escape(_fmt(value))}</td>"


def _md_block(block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + block.text
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Notice):
        return f"> **Note:** {block.text}"
    if isinstance(block, Table):
        lines = [f"**{block.caption}**", ""] if block.caption else []
        lines.append("| " + " | ".join(_md_cell(c) for c in block.columns) + " |")
        lines.append("|" + "|".join("---:" if _numeric_column(block, i) else "---"
                                    for i in range(len(block.columns))) + "|")
        lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Image):
        return f"![{block.caption}]({block.path})\n\n*{block.caption}*"
    if isinstance(block, Gallery):
        return "\n\n".join(_md_block(i) for i in block.images)
    if isinstance(block, Code):
        return f"```{block.language}\n{block.text}\n```"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _md_cell(value) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _numeric_column(table: Table, i: int) -> bool:
    values = [row[i] for row in table.rows if row[i] not in ("", None)]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _fmt(value) -> str:
    """Cells: integers as they are, floats to 4 significant digits, None and NaN as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _inline(text: str) -> str:
    """Escaped HTML with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
