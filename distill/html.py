"""A report's markdown as one self-contained HTML file: tables styled, every image it references
inlined as a data URI, so `report.html` opens offline, mailed or moved, with its plots."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1rem 0; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""
IMAGE = re.compile(r'<img alt="([^"]*)" src="([^":]+\.png)"')


def _inline(match: re.Match, folder: Path) -> str:
    alt, name = match.groups()
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"`{path}`: image referenced by the report does not exist")
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{alt}" src="data:image/png;base64,{data}"'


def markdown_to_html(markdown_text: str, folder: Path, title: str) -> str:
    """`markdown_text` (tables allowed) -> a whole HTML page; images are read from `folder`."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    body = IMAGE.sub(lambda m: _inline(m, Path(folder)), body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_html_report(folder: Path, markdown_name: str = "report.md", title: str = "distill report") -> Path:
    """`folder/report.md` -> `folder/report.html`."""
    folder = Path(folder)
    out = folder / Path(markdown_name).with_suffix(".html").name
    out.write_text(markdown_to_html((folder / markdown_name).read_text(), folder, title))
    return out
