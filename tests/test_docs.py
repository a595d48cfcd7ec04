"""The documentation a user reads: every relative link in README.md, CHANGELOG.md and docs/*.md
leads to a file that exists and, when it names a section, to a heading there; and the pages speak
to users, not to the people who wrote them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _outside_code(text: str) -> list[str]:
    """The page's lines that are not inside fenced code blocks (a `# comment` in a shell example is
    no heading, and a `[x](y)` in code is no link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated heading numbered."""
    seen: dict[str, int] = {}
    found = set()
    for line in _outside_code(page.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    links = []
    for line in _outside_code(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is shown, not followed
        links += [t for t in LINK.findall(line) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    return links


def test_the_anchor_rule_matches_githubs(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# A\n## Functions: `$code:` and `$py:`\n## What differs from walkerOS 4.4.0, on purpose\n"
        "## A\n```sh\n# not a heading\n```\n"
    )
    assert anchors(page) == {"a", "functions-code-and-py", "what-differs-from-walkeros-440-on-purpose", "a-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert page.exists(), page
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_is_a_front_page_that_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 16_384
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    for guide in (ROOT / "docs").glob("*.md"):
        assert guide.resolve() in linked, f"README.md does not link {guide.relative_to(ROOT)}"
    for target in ("LICENSE", "CHANGELOG.md"):
        assert (ROOT / target).resolve() in linked, target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_to_users(page):
    text = page.read_text()
    internal = re.findall(r"(?i)\bissues? #?\d+|\bthis machine\b|\bthe development machine\b", text)
    assert not internal, f"{page.relative_to(ROOT)}: {internal}"


def test_every_pipeline_flag_is_in_the_options_table():
    import argparse

    from pipeline.options import WalkerosOptions

    parser = argparse.ArgumentParser()
    WalkerosOptions._add_argparse_args(parser)
    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--") and o != "--help"]
    guide = (ROOT / "docs" / "operations.md").read_text()
    table = guide[guide.index("### Pipeline options") : guide.index("## Exit status and summary")]
    missing = [flag for flag in flags if f"`{flag}`" not in table]
    assert len(flags) > 20 and not missing, f"docs/operations.md's Pipeline options table lacks {missing}"
