"""mkdocs hook: show a figure only when its image exists at build time.

A page marks the spot with ``<!-- figure: img/name.png | alt text -->``; the marker becomes
an image when ``docs/img/name.png`` exists and stays an invisible comment otherwise.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

MARKER = re.compile(r"<!--\s*figure:\s*(?P<path>[^|>]+?)\s*\|\s*(?P<alt>[^>]*?)\s*-->")


def on_page_markdown(markdown, page, config, files):
    docs_dir = Path(config["docs_dir"])
    page_dir = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match) -> str:
        path = match["path"]
        if not (docs_dir / page_dir / path).is_file():
            return match[0]
        return f"![{match['alt']}]({path})"

    return MARKER.sub(replace, markdown)
