"""The repository stands alone: every pointer into docs/ from the code, the tests and the docs names a file that exists
and, with `#anchor`, a heading of it; nothing points outside the repository (the method definitions live in
docs/methods.md); `layerfuse fusers` names each fuser's section."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner
from layerfuse.fusion import list_fusers
from layerfuse.pipeline.cli import main

from tests.support import REPO

SOURCES = ("core", "fusion", "plugins_trt", "export", "pipeline", "bench", "tests", "docs")
# a docs file named from the repository root ("docs/methods.md#igva") or from inside docs/ ("(methods.md#igva)")
_ROOT_REF = re.compile(r"docs/([\w-]+\.md)(#[\w-]+)?")
_DOCS_LINK = re.compile(r"\]\(([\w-]+\.md)(#[\w-]+)?\)")
# pointers to the method spec that used to live outside the repository
_OUTSIDE = re.compile(r"shared/SPEC|SPEC section|SPEC §|SPEC's")


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # headings only, not comments in code blocks
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def files() -> list[Path]:
    out = [REPO / "README.md", REPO / "BENCHMARKS.md"]
    for folder in SOURCES:
        out += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md") and "build" not in p.parts]
    return [p for p in out if p.is_file()]


def references(path: Path) -> list[tuple[str, str | None]]:
    text = path.read_text()
    refs = [(m.group(1), m.group(2)) for m in _ROOT_REF.finditer(text)]
    if path.parent == REPO / "docs":
        refs += [(m.group(1), m.group(2)) for m in _DOCS_LINK.finditer(text)]
    return refs


def test_anchor_follows_github() -> None:
    assert anchor("Baseline and External Direct") == "#baseline-and-external-direct"
    assert anchor("Departures from the papers and their code") == "#departures-from-the-papers-and-their-code"
    assert anchor("The `layerfuse` cache (v1)") == "#the-layerfuse-cache-v1"


def test_every_docs_reference_resolves() -> None:
    known = {p.name: anchors(p) for p in (REPO / "docs").glob("*.md")}
    bad, seen = [], 0
    for path in files():
        for name, where in references(path):
            seen += 1
            if name not in known or (where is not None and where not in known[name]):
                bad.append(f"{path.relative_to(REPO)}: docs/{name}{where or ''}")
    assert seen > 20  # the pattern finds the references (the fusers alone name their sections)
    assert not bad, "references to missing docs or headings:\n" + "\n".join(bad)


def test_nothing_points_outside_the_repository() -> None:
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files() if p != Path(__file__)
            for i, line in enumerate(p.read_text().splitlines(), 1) if _OUTSIDE.search(line)]
    assert not hits, "pointers to the old out-of-repository spec (point to docs/methods.md and a section anchor):\n" + "\n".join(hits)


def test_fusers_command_names_each_fusers_section() -> None:
    out = CliRunner().invoke(main, ["fusers"]).output
    sections = anchors(REPO / "docs" / "methods.md")
    for name in list_fusers():
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        m = re.search(r"docs/methods\.md(#[\w-]+)", line)
        assert m and m.group(1) in sections, line
