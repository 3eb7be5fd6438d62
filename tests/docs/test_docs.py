"""The docs: the mkdocs site builds with --strict (a missing page, a broken link or anchor fails), and every relative
link in README.md and docs/*.md resolves, anchors included (mkdocs does not read the README)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from tests.support.models import ROOT

MKDOCS = Path(sys.executable).with_name("mkdocs")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def test_the_site_builds_strict_offline_outside_the_checkout(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    # Offline: no web font, no script or style from another host.
    page = (tmp_path / "site" / "index.html").read_text()
    assert "fonts.googleapis.com" not in page and "fonts.gstatic.com" not in page


def outside_code(text: str) -> str:
    """The markdown without its fenced blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The ids Python-Markdown's toc gives the page's headings (what mkdocs and GitHub link to)."""
    headings = re.findall(r"^#+ (.+)$", outside_code(page.read_text().replace("`", "")), flags=re.M)
    return {slugify(heading.strip(), "-") for heading in headings}


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(outside_code(page.read_text()))
            if not re.match(r"[a-z]+:", target)]  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_is_a_short_start_that_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {target.partition("#")[0] for target in relative_links(ROOT / "README.md")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md links no docs/{page.name}"
