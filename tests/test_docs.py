"""The guides in docs/ cannot go stale: every ```python block of each page runs.

The blocks of one page run in order in one shared namespace, as a reader
would paste them into one session. Errors point at the page's own line numbers.
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the block's first code line, code)`` for each ```python block."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in BLOCK.finditer(text)]


def test_there_are_guides_to_run():
    names = [page.name for page in PAGES]
    assert "foundations.md" in names and "layers.md" in names


def test_block_extraction_finds_fenced_python_only():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "b = a + 1\n")]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_python_block_of_the_page_runs(page, capsys):
    text = page.read_text()
    blocks = python_blocks(text)
    assert blocks, f"{page.name} has no ```python blocks"
    # every fence that opens a code block is either python or a non-executable kind
    for fence in re.findall(r"^```(\S*)\n", text, flags=re.M):
        assert fence in ("python", "bash", "text", "console", ""), fence
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    for line, code in blocks:
        # pad so tracebacks show the line number in the Markdown file
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)  # noqa: S102
