"""The worked examples of the docs pages run as written, on every backend.

Each page's Python blocks run in order in one namespace, as a reader would
paste them; the blocks assert what the page says they show.
"""

import re
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ["steering.md", "debugging.md", "domains.md", "adaptation.md"]


def python_blocks(page):
    # A block inside a list item is indented as the item's text.
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    return [textwrap.dedent(block) for block in blocks]


@pytest.mark.parametrize("page", PAGES)
def test_the_page_examples_run(page, capsys):
    blocks = python_blocks(page)
    assert blocks, f"docs/{page} has no Python example"
    namespace = {}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)
