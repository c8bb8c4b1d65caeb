"""The map stays true: every document the tree cites is in the repository, every numbered
section it cites exists, docs/architecture.md names every module, and the rules the module
headers state hold.

A citation is `docs/protocol.md §N` (also `protocol.md §N`, `protocol §N`, a range `§4-6`
or a run `§3 and §11`); a bare `§N` is allowed only inside a document, where it means that
document's own section. `RFC NNNN §N` is left alone."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

from aether_fast.config import SETTINGS, Config, load_config
from aether_fast.protocol import ERROR_CODES
from tests.conftest import ROOT

SCANNED = ("aether_fast", "ext", "tools", "bench", "docs", "tests", "clients")
SUFFIXES = frozenset({".py", ".pyx", ".pxi", ".pyi", ".md", ".js", ".mjs", ".html", ".c"})
SKIPPED_DIRS = frozenset({"node_modules", "__pycache__", ".venv", "build"})

#: Documents that are not in the repository and must not be cited.
OUTSIDE = re.compile(r"\bSPEC\b|\bSTYLE\.md\b|\bFACTS\.md\b|(?i:\bthe seed\b|\bseed's\b)")
DOC_NAMES = frozenset(p.stem for p in (ROOT / "docs").glob("*.md"))
#: A run of section numbers: §5, §12-18 (or with an en dash), §4/§5, §5, §7, §3 and §11.
RANGE = r"§\s?\d+(?:[-\u2013]\d+)?"
SECTIONS = re.compile(rf"{RANGE}(?:(?:\s*/\s*|,\s*|\s+and\s+){RANGE})*")
ANCHOR = re.compile(r"\]\(((?:[\w./-]+\.md)?)#([\w-]+)\)")


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if SKIPPED_DIRS & set(rel.parts) or not path.is_file():
                continue
            if path.suffix not in SUFFIXES or (rel.parts[0] == "ext" and path.suffix == ".c"):
                continue
            files.append(path)
    return files


#: Every scanned file but this one, whose examples are not citations.
FILES = {
    str(p.relative_to(ROOT)): p.read_text(errors="replace")
    for p in scanned_files()
    if p != Path(__file__).resolve()
}


def numbered_sections(doc: str) -> set[int]:
    text = (ROOT / "docs" / f"{doc}.md").read_text()
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, re.M)}


def slugs(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        text = heading.strip().lower().replace("`", "")
        out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def citations(rel: str, text: str) -> list[tuple[str, int, int]]:
    """(document stem, section, line) of each section citation in `text`; document "" when
    a bare § is outside a document."""
    own = Path(rel).stem if rel.startswith("docs/") else ""
    found = []
    for m in SECTIONS.finditer(text):
        before = text[max(0, m.start() - 40) : m.start()]
        if re.search(r"RFC\s*\d+\s*$", before):
            continue
        name = re.search(r"([\w./-]+?)(?:\.md)?[\]\s,:(`\"]*$", before)
        stem = name.group(1).rsplit("/", 1)[-1] if name else ""
        doc = stem if stem in DOC_NAMES else own
        line = text.count("\n", 0, m.start()) + 1
        for n in re.findall(r"\d+", m.group(0)):
            found.append((doc, int(n), line))
    return found


def test_no_citation_of_a_document_outside_the_repository() -> None:
    bad = []
    for rel, text in FILES.items():
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{rel}:{i}: {line.strip()}")
    hint = "cite docs/protocol.md §N (or operations.md, security.md) instead:\n"
    assert not bad, hint + "\n".join(bad)


def test_every_markdown_file_named_exists() -> None:
    bad = []
    for rel, text in FILES.items():
        here = (ROOT / rel).parent
        for name in set(re.findall(r"(?<![\w/.-])([\w./-]*[\w-]\.md)\b", text)):
            if OUTSIDE.search(name) or name.startswith(("http", "//")):
                continue  # reported by the test above
            if not any(
                (base / name).is_file()
                for base in (ROOT, here, ROOT / "docs", ROOT / "bench" / "results")
            ):
                bad.append(f"{rel}: {name}")
    assert not bad, bad


def test_every_cited_section_exists() -> None:
    have = {doc: numbered_sections(doc) for doc in DOC_NAMES}
    bad = []
    for rel, text in FILES.items():
        for doc, n, line in citations(rel, text):
            if not doc:
                bad.append(f"{rel}:{line}: §{n} names no document (docs/protocol.md §{n}?)")
            elif n not in have[doc]:
                bad.append(f"{rel}:{line}: docs/{doc}.md has no §{n}")
    assert not bad, "\n".join(bad)


def test_the_citation_finder_reads_each_form() -> None:
    """The finder itself: each form a citation takes here is read as the document meant."""
    got = citations(
        "tests/x.py",
        "docs/protocol.md §3 and §11; [protocol.md §15](x); protocol §6, operations.md §12\u201318;"
        " RFC 6455 §5.2; the §4 shape",
    )
    assert [(d, n) for d, n, _ in got] == [
        ("protocol", 3),
        ("protocol", 11),
        ("protocol", 15),
        ("protocol", 6),
        ("operations", 12),
        ("operations", 18),
        ("", 4),
    ]
    assert [(d, n) for d, n, _ in citations("docs/operations.md", "`HEALTHCHECK` (§12)")] == [
        ("operations", 12)
    ]


def test_every_link_anchor_exists() -> None:
    bad = []
    for rel, text in FILES.items():
        if not rel.endswith(".md"):
            continue
        for target, anchor in ANCHOR.findall(text):
            path = (ROOT / rel).parent / target if target else ROOT / rel
            if anchor not in slugs(path):
                bad.append(f"{rel}: {target}#{anchor}")
    assert not bad, bad


def test_protocol_is_the_numbered_contract() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    assert "normative" in text.split("\n## ", 1)[0]
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", text, re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 15
    assert len(re.findall(r"^## ", text, re.M)) == len(numbers), "every section is numbered"


# -- docs/architecture.md names every module -----------------------------------------------

ARCH = (ROOT / "docs" / "architecture.md").read_text()


def module_files() -> list[str]:
    out = []
    for top in ("aether_fast", "ext"):
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if not path.is_file() or "__pycache__" in rel.parts:
                continue
            if path.suffix in (".so", ".pyc") or (top == "ext" and path.suffix in (".c", ".html")):
                continue  # build outputs
            out.append(str(rel))
    return out


def test_architecture_names_every_module() -> None:
    files = module_files()
    assert "aether_fast/workers.py" in files and "ext/core.pyx" in files
    missing = []
    for rel in files:
        inner = rel.removeprefix("aether_fast/")
        if f"`{rel}`" not in ARCH and f"`{inner}`" not in ARCH:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_architecture_names_the_tools_the_benches_and_the_clients() -> None:
    for name in ("`tools/", "`bench/", "`clients/js/", "`workers.py`"):
        assert name in ARCH, name
    assert "one worker process" not in ARCH.lower()
    assert "nothing on the way back up" not in ARCH


# -- the rules the module headers state ----------------------------------------------------


def test_config_defaults_are_written_once_in_settings() -> None:
    """config.py: every setting is declared once. `Config` has no default of its own (a
    second copy drifted: metrics_host and jwt_secret differed from their rows)."""
    with_default = [
        f.name
        for f in fields(Config)
        if f.default is not MISSING or f.default_factory is not MISSING
    ]
    assert not with_default
    files = {"jwt_public_key_file", "jwt_private_key_file"}  # read into the key fields
    want = ({s.name for s in SETTINGS} - files) | {"jwt_secret_generated"}
    assert {f.name for f in fields(Config)} == want
    config = load_config({})
    for s in SETTINGS:
        if s.name not in files | {"jwt_secret", "metrics_host"}:
            assert getattr(config, s.name) == s.default, s.name
    assert config.metrics_host == config.ws_host and config.jwt_secret_generated


def test_error_codes_are_defined_only_in_protocol() -> None:
    """protocol.py: every code a client can see is defined there, once."""
    assign = re.compile(
        r"^\s*\w+\s*(?::[^=\n]+)?=\s*[\"'](" + "|".join(sorted(ERROR_CODES)) + r")[\"']", re.M
    )
    bad = []
    for rel, text in FILES.items():
        if rel.startswith(("aether_fast/", "ext/")) and rel != "aether_fast/protocol.py":
            bad += [f"{rel}: {m.group(0).strip()}" for m in assign.finditer(text)]
    assert not bad, bad


def test_connection_header_names_every_frame_that_bypasses_the_outbox() -> None:
    """connection.pxi: the outbox rule names each frame written straight to picows."""
    header = FILES["ext/connection.pxi"].split("\n\n", 1)[0]
    direct = set()
    for rel, text in FILES.items():
        if rel.startswith("ext/"):
            direct |= set(re.findall(r"transport\.(send_\w+)\(", text))
    assert direct, "no direct sends found: the pattern is stale"
    for name in sorted(direct):
        assert name in header, name
