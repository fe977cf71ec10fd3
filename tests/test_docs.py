"""The code cites the project's own docs/ (docs/methods.md, docs/design.md), and every cited section exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("pipeline", "transforms", "steering", "bench", "tests", "dataflow") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".md", ".yaml")] + [ROOT / "README.md", ROOT / "ARCHITECTURE.md"]
CITATION = re.compile(r"docs/(methods|design)\.md((?:[\s,;]*(?:and\s+)?§\d+(?:\.\d+)?(?:-\d+)?)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)(?:-(\d+))?")


def sections(page: str) -> set[str]:
    """Section numbers of a docs page, from its headings ("## 3. Data contracts", "### 1.2 Stimuli")."""
    text = (ROOT / "docs" / f"{page}.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def citations() -> list[tuple[Path, str, str]]:
    """(file, page, section) for every section cited as ``docs/<page>.md §N`` (ranges expanded)."""
    found = []
    for path in SOURCES:
        for page, tail in CITATION.findall(path.read_text(errors="replace")):
            for start, end in SECTION.findall(tail):
                numbers = [str(n) for n in range(int(start), int(end) + 1)] if end else [start]
                found += [(path, page, number) for number in numbers]
    return found


def test_no_citation_of_files_users_never_see():
    stale = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if re.search(r"(?<![/\w])(METHODS|DESIGN)\.md|\.\./shared/(METHODS|DESIGN)", line)]
    assert not stale, f"cite docs/methods.md or docs/design.md instead: {stale}"


def test_every_cited_section_exists():
    cited = citations()
    assert len(cited) >= 20, "the code's citations of docs/ were not found; did the citation format change?"
    known = {page: sections(page) for page in ("methods", "design")}
    missing = sorted({f"{p.relative_to(ROOT)}: docs/{page}.md §{n}" for p, page, n in cited if n not in known[page]})
    assert not missing, f"cited sections missing from docs/: {missing}"


def test_methods_keeps_the_section_numbers_the_code_cites():
    assert {"1", "1.1", "1.2", "1.3", "1.4", "1.5", "2", "3", "4", "5"} <= sections("methods")
    assert {"1", "2", "3", "4", "5"} <= sections("design")
