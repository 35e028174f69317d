"""The user docs (README.md and docs/**/*.md): links resolve, the README stays a short front door, no page
narrates the project's history, and "the post" is always linked."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
POST_URL = "https://followfox.ai/tpost/92hz3j62o1-cycling-learning-rates-for-stable-diffus"
README_MAX_LINES = 320
# Phrases that tell how the code came to be rather than what it does.
HISTORY_PHRASES = [
    "used to",
    "the issue",
    "issue #",
    "no session",
    "this session",
    "we tried",
    "previously",
    "was fixed",
    "now fixed",
    "has been changed",
    "was changed",
]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+).+?\1")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("**", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    found = []
    for number, line in prose_lines(path):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
            continue
        for match in INLINE_LINK.finditer(CODE_SPAN.sub("", line)):
            found.append((number, match.group(1)))
    return found


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) is not None


def test_docs_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in DOCS}
    assert "README.md" in names
    assert {"docs/config-keys.md", "docs/data.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(path):
    broken = []
    for number, target in links(path):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not destination.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{where} (no heading with that anchor in {destination.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short_and_has_a_table_of_contents():
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(text.splitlines())} lines (at most {README_MAX_LINES}): move detail to a page in docs/"
    )
    assert "## Contents" in text, "README.md needs a '## Contents' section"
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\s*[-*]\s+\[[^\]]+\]\(#([^)]+)\)", contents, flags=re.M))
    sections = {github_slug(line[3:]) for _, line in prose_lines(readme) if line.startswith("## ")}
    sections.discard("contents")
    assert sections - listed == set(), "README sections missing from its table of contents"
    assert listed - sections == set(), "README table of contents lists sections that do not exist"


def test_readme_has_the_two_set_up_commands_at_the_top():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_no_development_history(path):
    found = [
        f"{path.relative_to(ROOT)}:{number}: '{phrase}': {line.strip()}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for phrase in HISTORY_PHRASES
        if re.search(rf"\b{re.escape(phrase)}", line, flags=re.I)
    ]
    assert not found, "user docs say what the code does, not how it came to be:\n" + "\n".join(found)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_the_post_is_linked(path):
    text = path.read_text(encoding="utf-8")
    if re.search(r"\bthe post\b", text, flags=re.I):
        assert POST_URL in text, f"{path.relative_to(ROOT)} names the post: link it once ({POST_URL})"
