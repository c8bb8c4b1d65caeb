"""Read the Dockerfile and .dockerignore the way Docker does, for tests without a Docker engine.

- `parse(text)`: the instructions (line continuations joined, comments dropped) grouped into
  stages, with the exec (JSON) or shell form of each one's arguments.
- `Ignore(text)`: .dockerignore matching (Go `filepath.Match` patterns, `**`, `!` exceptions,
  the last matching line wins, a pattern that matches a directory covers what is inside).
- `context_files(root, ignore)`: the files a `docker build root` would send.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the raw text after the keyword
    line: int  # 1-based line of the keyword

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            _, _, text = text.partition(" CMD ")
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
        return value

    def flags(self) -> dict[str, str]:
        """`--name=value` options before the arguments (COPY --from, HEALTHCHECK --interval)."""
        out: dict[str, str] = {}
        for word in shlex.split(self.args):
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            out[name] = value
        return out

    def words(self) -> list[str]:
        """The arguments without the leading `--flags` (shell-split)."""
        words = shlex.split(self.args)
        while words and words[0].startswith("--"):
            words.pop(0)
        return words


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The ENV of this stage, in order (`KEY=value` pairs; `$VAR` left as written)."""
        out: dict[str, str] = {}
        for inst in self.all("ENV"):
            for pair in shlex.split(inst.args):
                key, sep, value = pair.partition("=")
                assert sep, f"line {inst.line}: use ENV KEY=value, not the legacy form"
                out[key] = value
        return out


@dataclass(slots=True)
class Dockerfile:
    args: list[Instruction]  # ARGs before the first FROM
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        yield start, " ".join(part for part in buf if part)
        buf = []
    if buf:
        yield start, " ".join(buf)


def parse(text: str) -> Dockerfile:
    args: list[Instruction] = []
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        inst = Instruction(keyword.upper(), rest.strip(), line)
        if inst.keyword == "FROM":
            words = inst.words()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, [inst]))
        elif not stages:
            assert inst.keyword == "ARG", f"line {line}: {inst.keyword} before FROM"
            args.append(inst)
        else:
            stages[-1].instructions.append(inst)
    return Dockerfile(args, stages)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            # `**/` matches any number of directories, including none
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
            else:
                out.append(".*")
                i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.index("]", i)
            out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


class Ignore:
    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str], str]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negated, _pattern_regex(pattern), pattern))

    def excluded(self, path: str) -> bool:
        """True when `path` (relative, with /) is left out of the build context."""
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negated, regex, _ in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                result = not negated
        return result

    def may_include_under(self, directory: str) -> bool:
        """False when nothing under an excluded `directory` can be brought back by a `!`."""
        return any(
            negated and (pattern.startswith(directory + "/") or pattern == directory)
            for negated, _, pattern in self.rules
        )


def context_files(root: Path, ignore: Ignore) -> list[str]:
    """Relative paths of the files `docker build root` sends (sorted)."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        keep = []
        for d in dirnames:
            rel = f"{rel_dir}/{d}" if rel_dir else d
            if not ignore.excluded(rel) or ignore.may_include_under(rel):
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            rel = f"{rel_dir}/{f}" if rel_dir else f
            if not ignore.excluded(rel):
                files.append(rel)
    return sorted(files)
