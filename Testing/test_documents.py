"""The documents and the code's comments say what is, for a reader who has only the repository.

README.md, docs/*.md and benchmarks/README.md, and the comments and docstrings of the library, the Slicer module,
the scripts and the benchmarks, hold no dates, work sessions, revision/issue/pass numbers, clock times or links outside
the repository; their links, and the benchmark files they cite, point at files that exist. CHANGELOG.md is history by
nature and is not checked for wording. Publication metadata (CMakeLists.txt, TumorPersonalization.json,
CITATION.cff, scripts/prepare_index_entry.py, which writes those addresses) is not checked for links.
"""
import io
import re
import tokenize
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]

FORBIDDEN = [
    ("a date", re.compile(r"\b20\d\d-\d\d-\d\d\b")),
    ("a work session", re.compile(r"\bsittings?\b", re.IGNORECASE)),
    ("a revision number", re.compile(r"\brevision[ -]\d", re.IGNORECASE)),
    ("an issue number", re.compile(r"\bissue #?\d+", re.IGNORECASE)),
    ("a pass number", re.compile(r"\bpass \d", re.IGNORECASE)),
    ("a clock time", re.compile(r"\b\d{1,2}:\d\d(:\d\d)?\s*(UTC|Z\b)|\bUTC\b")),
    ("a link outside the repository", re.compile(r"https?://|\.\./shared")),
    ("the design file outside the repository", re.compile(r"DESIGN\.md")),
]
# Files that hold publication addresses on purpose: checked for everything but links.
LINKS_ALLOWED = {"scripts/prepare_index_entry.py"}


def documents():
    paths = [REPOSITORY / "README.md", REPOSITORY / "benchmarks" / "README.md"]
    paths += sorted((REPOSITORY / "docs").glob("*.md"))
    return paths


def python_files():
    paths = sorted((REPOSITORY / "TumorPersonalizationLib").rglob("*.py"))
    paths += sorted((REPOSITORY / "TumorPersonalization").glob("*.py"))
    paths += sorted((REPOSITORY / "scripts").glob("*.py"))
    paths += sorted((REPOSITORY / "benchmarks").glob("*.py"))
    return paths


def benchmark_results_documents():
    """The Markdown reports the benchmarks write (benchmarks/results/*.md)."""
    return sorted((REPOSITORY / "benchmarks" / "results").glob("*.md"))


def comments_and_docstrings(path: Path):
    """(line number, text) of every comment and every string literal that stands alone as a statement (docstrings)."""
    source = path.read_text(encoding="utf-8")
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    previous_significant = None
    for token in tokens:
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
        elif token.type == tokenize.STRING and (
                previous_significant is None or previous_significant.type in (tokenize.NEWLINE, tokenize.INDENT,
                                                                             tokenize.DEDENT)
                or previous_significant.string == ":"):
            for offset, line in enumerate(token.string.splitlines()):
                yield token.start[0] + offset, line
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous_significant = token


def hits_in(path: Path, lines):
    try:
        relative = path.relative_to(REPOSITORY).as_posix()
    except ValueError:
        relative = path.name
    found = []
    for number, text in lines:
        for what, pattern in FORBIDDEN:
            if what == "a link outside the repository" and relative in LINKS_ALLOWED:
                continue
            if pattern.search(text):
                found.append(f"{relative}:{number}: {what}: {text.strip()[:100]}")
    return found


def test_the_scanner_reads_comments_and_docstrings_and_skips_code(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Module text, revision 3."""\nURL = "https://example.org"  # see issue 12\n\n'
                      'def f():\n    """Run in one sitting."""\n    return "pass 2"\n', encoding="utf-8")
    lines = dict(comments_and_docstrings(sample))
    assert "revision 3" in lines[1] and "issue 12" in lines[2] and "sitting" in lines[5]
    assert all("https://" not in text and "pass 2" not in text for text in lines.values())


def test_the_patterns_catch_what_they_name():
    caught = {what for what, pattern in FORBIDDEN for text in
              ("2026-12-02", "the second sitting", "revision 4", "issue 9", "pass 1", "14:00-14:57 UTC",
               "see https://example.org", "../shared/DESIGN.md") if pattern.search(text)}
    assert caught == {what for what, _ in FORBIDDEN}
    assert not any(pattern.search("docs/design.md: the layers; 15 mm; bypass 2 ways; surpass 3")
                   for _, pattern in FORBIDDEN)


def test_documents_say_what_is_without_history_or_outside_links():
    found = []
    for path in documents():
        assert path.exists(), path
        found += hits_in(path, enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
    assert not found, "\n".join(found)


def test_comments_and_docstrings_say_what_is_without_history_or_outside_links():
    found = []
    for path in python_files():
        found += hits_in(path, comments_and_docstrings(path))
    assert not found, "\n".join(found)


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPOSITORY / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 180, f"README.md has {len(lines)} lines"
    head = lines[:15]
    assert any(line.startswith("make demo") for line in head), "make demo not within the first 15 lines"
    assert any(line.startswith("make test") for line in head), "make test not within the first 15 lines"


def test_relative_links_in_documents_point_into_the_repository():
    link = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")
    missing = []
    for path in documents() + [REPOSITORY / "CHANGELOG.md"] + benchmark_results_documents():
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target, _ in link.findall(text):
                resolved = (path.parent / target).resolve()
                if REPOSITORY not in resolved.parents or not resolved.exists():
                    missing.append(f"{path.relative_to(REPOSITORY)}:{number}: {target}")
    assert not missing, "\n".join(missing)


# A benchmark file named by its path from the repository root (benchmarks/results/solver.json), or, in
# benchmarks/README.md, from that folder (results/solver.json). Globs and brace lists (timing_repeats*.json,
# patients.{md,json,png}) name no single file and are not matched.
BENCHMARK_FILE = re.compile(r"(?<![\w/.*{])(?:\.\./)?(benchmarks/[\w./-]*\w\.(?:jsonl\.gz|jsonl|json|md|png|py))\b")
BENCHMARK_README_FILE = re.compile(r"(?<![\w/.*{])(results/[\w./-]*\w\.(?:jsonl\.gz|jsonl|json|md|png))\b")


def test_the_benchmark_file_pattern_reads_paths_and_skips_globs():
    text = ("see benchmarks/results/solver.json and ../benchmarks/README.md, "
            "`benchmarks/results/timing_repeats*.json`, benchmarks/results/inversion_runs.jsonl.gz")
    assert BENCHMARK_FILE.findall(text) == ["benchmarks/results/solver.json", "benchmarks/README.md",
                                            "benchmarks/results/inversion_runs.jsonl.gz"]
    assert BENCHMARK_README_FILE.findall("`results/patients.{md,json}`, `results/solver.json`") == [
        "results/solver.json"]


def test_benchmark_files_cited_in_documents_and_comments_exist():
    """A result moved or renamed leaves no document, comment or docstring pointing at its old path."""
    missing = []
    texts = [(path, enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
             for path in documents() + [REPOSITORY / "CHANGELOG.md"]]
    texts += [(path, comments_and_docstrings(path)) for path in python_files()]
    texts += [(path, comments_and_docstrings(path)) for path in sorted((REPOSITORY / "Testing").glob("*.py"))]
    for path, lines in texts:
        for number, text in lines:
            for cited in BENCHMARK_FILE.findall(text):
                if not (REPOSITORY / cited).exists():
                    missing.append(f"{path.relative_to(REPOSITORY)}:{number}: {cited}")
    readme = REPOSITORY / "benchmarks" / "README.md"
    for number, text in enumerate(readme.read_text(encoding="utf-8").splitlines(), 1):
        for cited in BENCHMARK_README_FILE.findall(text):
            if not (readme.parent / cited).exists():
                missing.append(f"benchmarks/README.md:{number}: {cited}")
    assert not missing, "\n".join(missing)
