"""The README and the docs/ pages: the generated config reference is current, and every link resolves."""

import re
from pathlib import Path

from coughreg.config.reference import config_reference

PROJECT = Path(__file__).resolve().parents[2]
README = PROJECT / "README.md"
DOCS = PROJECT / "docs"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.MULTILINE | re.DOTALL)
CODE = re.compile(r"`[^`\n]*`")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page outside code, without web addresses and same-page anchors."""
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    targets = [match.group(1) for match in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def linked_files(page: Path) -> set[Path]:
    return {(page.parent / target.split("#", 1)[0]).resolve() for target in relative_links(page)}


def test_the_config_reference_page_holds_the_generated_table():
    page = (DOCS / "config-reference.md").read_text(encoding="utf-8")
    assert START in page and END in page, f"docs/config-reference.md needs the lines {START.strip()} and {END}"
    section = page.split(START, 1)[1].split(END, 1)[0]
    assert section == config_reference(), "the config reference is stale: run python pipeline.py config-reference --write"
    for key in ("training.differential_learning_rate_layers", "audio.spectrogram_normalization", "cluster.s3_secret"):
        assert f"`{key}`" in section


def test_the_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail into a docs/ page"


def test_every_relative_link_points_at_a_file_that_exists():
    broken = [f"{page.relative_to(PROJECT)}: {target}" for page in pages() for target in relative_links(page)
              if not (page.parent / target.split("#", 1)[0]).exists()]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_readme_links_every_docs_page():
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "docs/ holds no pages"
    linked = linked_files(README)
    missing = [page.name for page in docs if page.resolve() not in linked]
    assert not missing, f"README.md links no docs/ page named {missing}"
