"""The README and docs/ promise files and commands: every report and bench path they name exists,
every link lands on a page and a heading, every benchmark has its entry, and the README stays a
short front door. A report that needs hardware not yet lent is named as not yet measured."""

import re
from pathlib import Path

import pytest

from compressor.cli import parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:reports|bench)/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
NOT_YET = "not yet measured"


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(page), flags=re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def mentioned_paths(text: str):
    """(path, its line with the lines either side) for every reports/ or bench/ path in a page."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for m in PATH.finditer(line):
            yield m.group(1), " ".join(lines[max(0, i - 1) : i + 2])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_report_and_bench_path_named_exists_or_is_said_not_yet_measured(page):
    missing = [
        path for path, context in mentioned_paths(_text(page)) if not (ROOT / path).exists() and NOT_YET not in context
    ]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_lands_on_a_file_and_a_heading(page):
    broken = []
    for target in LINK.findall(_text(page)):
        if re.match(r"[a-z]+:", target):
            continue  # an outside address
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_every_benchmark_has_an_entry_on_the_benchmarks_page():
    page = _text(ROOT / "docs" / "benchmarks.md")
    scripts = [p for p in sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "bench").glob("*.sh"))]
    absent = [p.name for p in scripts if not p.name.startswith("_") and f"bench/{p.name}" not in page]
    assert not absent, f"docs/benchmarks.md has no entry for {absent}"


def test_the_readme_is_a_short_door_with_the_setup_and_test_commands_and_every_page():
    readme = _text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 250
    setup = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints-cpu.txt -e . "
        "&& compressor run stacks/quickstart.yaml"
    )
    test = "pip install -c constraints-cpu.txt -e '.[dev]' && python -m pytest -q"
    assert setup in readme.splitlines()
    assert test in readme.splitlines() and test in _text(ROOT / ".ci" / "run").splitlines()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_help_ends_with_where_the_docs_are():
    text = parser().format_help().rstrip()
    assert text.splitlines()[-1].startswith("docs: ")
    assert str(ROOT / "docs") in text


def test_the_path_check_catches_a_made_up_report_and_spares_a_not_yet_measured_one():
    text = "see `reports/no_such_report.json` for it.\n\n\n`reports/gpu_future.json` is not yet measured."
    missing = [p for p, ctx in mentioned_paths(text) if not (ROOT / p).exists() and NOT_YET not in ctx]
    assert missing == ["reports/no_such_report.json"]
    assert _slug("Deployed in llama.cpp, ours vs llama.cpp's own quantizer") == (
        "deployed-in-llamacpp-ours-vs-llamacpps-own-quantizer"
    )
