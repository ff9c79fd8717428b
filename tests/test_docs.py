"""The README and docs/: every relative link reaches a file (and its #anchor a heading of that file), and the
commands the front page cites exist as cited."""

from __future__ import annotations

import re
from pathlib import Path

import fusedtrain
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target), not inside inline code; targets without a scheme are relative links.
LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation other than '-' and '_' dropped, spaces
    to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "``", text)  # nor does inline code
    return LINK.findall(text)


def test_slug_matches_github() -> None:
    assert slug("Example: a small CNN on digits — optimizers, dropout, augmentation") == \
        "example-a-small-cnn-on-digits--optimizers-dropout-augmentation"
    assert slug("Whole training iterations (`--family train`)") == "whole-training-iterations---family-train"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    found = links(page)
    assert found, f"{page.name} has no links"
    broken = []
    for target in found:
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_every_docs_page() -> None:
    readme = set(links(ROOT / "README.md"))
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_quick_start_matches_ci() -> None:
    """The README's test command is what CI runs (.ci/run), and the optim page keeps the headings the
    maintainers extend."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/dev.sh test" in readme and re.search(r"^bash scripts/dev\.sh test\b", ci, re.MULTILINE)
    assert "bash scripts/dev.sh bench" in readme
    optim = (ROOT / "docs" / "optim.md").read_text()
    assert "\n## The step: a cached plan, and CapturedStep\n" in optim and "\n## Optimizers\n" in optim
    table = optim.split("\n## Optimizers\n", 1)[1].split("\n## ", 1)[0]
    classes = [name for name in fusedtrain.optim.__all__
               if isinstance(getattr(fusedtrain.optim, name), type)
               and issubclass(getattr(fusedtrain.optim, name), torch.optim.Optimizer)]
    assert "NAdam" in classes
    missing = [name for name in classes if f"`fusedtrain.optim.{name}`" not in table]
    assert not missing, f"docs/optim.md, ## Optimizers: no row for {missing}"
