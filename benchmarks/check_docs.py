"""Check that every measured figure in README.md and docs/*.md matches the committed result JSON it
names (docs/results.md describes the convention). Run: `python3 -m afd.benchmarks.check_docs`
(exit 1 and one line per problem when a figure is off, a file or key is missing, or a measured
figure stands unannotated).

A results comment names a JSON file (relative to the repository root) and holds templates:

    <!-- results: benchmarks/results/<machine>/<name>.json
    | {m} | {decode_tokens_per_s:.0f} | ...          one line, fields from the JSON
    each runs where num_scheduler_steps=4: | {m} |   one line per element of a list
    -->

Every rendered line must appear verbatim in the block that follows the comment (up to the next
blank line; runs of white space count as one space, so prose may wrap). Inside that block, no
other decimal number, percentage or `Nx` factor may stand.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMENT = re.compile(r"<!--\s*results:\s*(?P<path>\S+)(?P<body>.*?)-->", re.S)
FIELD = re.compile(r"\{(?P<path>[^{}:]+)(?::(?P<fmt>[^{}]*))?\}")
EACH = re.compile(r"^each\s+(?P<path>[^\s:]+)(?:\s+where\s+(?P<key>[\w.]+)=(?P<value>[^:]+))?:\s?")
# a measured figure: a decimal number, a percentage or a factor like 2x (integers alone may be
# sizes, counts or flags)
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:%|x\b)|(?<![\w.])\d+\.\d+(?![\w.])")
# figures outside any results block that can only be measurements
UNBACKED = re.compile(
    r"(?<![\w.])\d[\d,.]*\s*(?:GB/s|TFLOP/s|tok/s|tokens/s|req/s)|(?<![\w.])\d+\.\d+x\b"
)


@dataclass
class Problem:
    """One mismatch, located in a document."""

    doc: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.message}"


def lookup(data: Any, path: str) -> Any:
    """`runs[1].speedup_vs_m1` in nested dicts and lists (negative indices allowed)."""
    value = data
    for name, index in re.findall(r"([^.\[\]]+)|\[(-?\d+)\]", path.strip()):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            raise KeyError(f"no {path.strip()!r} in the result") from None
    return value


def render(template: str, data: Any, scope: Any = None) -> str:
    """Fill `{path:format}` fields, looking each path up in `scope` first, then in `data`."""

    def field(m: re.Match) -> str:
        path, fmt = m["path"], m["fmt"] or ""
        path, star, factor = path.partition("*")  # {step_time_s*1000:.1f}: seconds as ms
        value = None
        for source in (scope, data):
            if source is None:
                continue
            try:
                value = lookup(source, path)
                break
            except KeyError:
                continue
        else:
            raise KeyError(f"no {path!r} in the result")
        if value is None:
            raise KeyError(f"{path!r} is null in the result")
        if star:
            try:
                value *= float(factor)
            except (TypeError, ValueError):
                raise KeyError(f"cannot scale {path!r} by {factor!r}") from None
        return format(value, fmt)

    return FIELD.sub(field, template)


def render_lines(body: str, load: Any, first: str) -> list[tuple[str, str]]:
    """Every (line, file) a results comment's templates produce; `load(path)` reads a result
    file, `first` is the comment's own. A line `results: PATH` switches the file for the
    templates after it."""
    lines: list[tuple[str, str]] = []
    rel, data = first, load(first)
    for template in body.strip("\n").splitlines():
        template = template.strip()
        if not template:
            continue
        switch = re.fullmatch(r"results:\s*(\S+)", template)
        if switch:
            rel, data = switch[1], load(switch[1])
            continue
        each = EACH.match(template)
        if not each:
            lines.append((render(template, data), rel))
            continue
        items = lookup(data, each["path"])
        if not isinstance(items, list):
            raise KeyError(f"{each['path']!r} is not a list")
        rest = template[each.end() :]
        for item in items:
            if each["key"] and str(lookup(item, each["key"])) != each["value"].strip():
                continue
            lines.append((render(rest, data, item), rel))
    return lines


def following_block(text: str, start: int) -> tuple[int, int]:
    """[start, end) of the paragraph or table after position `start`: up to the first blank line
    once some text was seen."""
    pos = start
    while pos < len(text) and text[pos] in " \t\n":
        pos += 1
    end = text.find("\n\n", pos)
    return pos, len(text) if end < 0 else end


def is_tracked(path: Path, root: Path) -> bool | None:
    """Whether git tracks `path` (None when `root` is no git checkout)."""
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "ls-files", "--error-unmatch", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0 and b"not a git repository" in r.stderr:
        return None
    return r.returncode == 0


def check_text(
    text: str, doc: str, root: Path = ROOT, require_tracked: bool = True, unbacked: bool = True
):
    """Problems in one document's text; `unbacked`: also flag measured-looking figures outside
    every results block (README.md)."""
    problems: list[Problem] = []
    covered: list[tuple[int, int]] = []
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    # examples in code (fenced or inline) are neither comments nor figures
    blank = lambda c: re.sub(r"\S", " ", c.group())  # noqa: E731
    scan = re.sub(r"`[^`\n]+`", blank, re.sub(r"```.*?```", blank, text, flags=re.S))
    for m in COMMENT.finditer(scan):
        where = line_of(m.start())
        start, end = following_block(text, m.end())
        covered.append((m.start(), end))  # reported once here, not again as unbacked figures
        first = m["path"]

        def load(rel: str) -> Any:
            path = root / rel
            if not path.is_file():
                raise FileNotFoundError(f"{rel}: no such file")
            if require_tracked and is_tracked(path, root) is False:
                raise FileNotFoundError(f"{rel}: not committed (git does not track it)")
            try:
                return json.loads(path.read_text())
            except ValueError as e:
                raise FileNotFoundError(f"{rel}: not JSON ({e})") from None

        try:
            lines = render_lines(m["body"], load, first)
        except FileNotFoundError as e:
            problems.append(Problem(doc, where, str(e)))
            continue
        except (KeyError, TypeError, ValueError) as e:
            problems.append(Problem(doc, where, f"{first}: {e}"))
            continue
        # wrapped prose: a rendered line may span line breaks, so compare with spaces collapsed
        masked = " ".join(text[start:end].split())
        for line, rel in ((" ".join(x.split()), rel) for x, rel in lines):
            at = masked.find(line)
            if at < 0:
                # report the closest stretch of the text once, and leave its figures at that
                near = _closest(masked, line)
                problems.append(
                    Problem(doc, line_of(start), f"{rel} gives {line!r}; the text has {near!r}")
                )
                at, line = masked.find(near), near
            masked = masked[:at] + " " * len(line) + masked[at + len(line) :]
        for stray in FIGURE.finditer(masked):
            problems.append(
                Problem(
                    doc,
                    line_of(start),
                    f"{stray.group()!r} is not produced by the results comment's templates",
                )
            )
    outside = scan if unbacked else ""
    for a, b in covered:
        outside = outside[:a] + " " * (b - a) + outside[b:]
    for stray in UNBACKED.finditer(outside):
        problems.append(
            Problem(
                doc,
                line_of(stray.start()),
                f"{stray.group()!r} looks measured but no results comment backs it",
            )
        )
    return problems


def _closest(text: str, line: str) -> str:
    """The stretch of `text` as long as `line` that agrees with it in the most characters."""
    n = len(line)
    best = max(
        range(max(1, len(text) - n + 1)),
        key=lambda i: sum(1 for x, y in zip(text[i : i + n], line, strict=False) if x == y),
    )
    return text[best : best + n]


def default_docs(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m afd.benchmarks.check_docs", description=__doc__)
    p.add_argument("docs", nargs="*", help="markdown files (default: README.md, docs/*.md)")
    args = p.parse_args(argv)
    docs = [Path(d) for d in args.docs] or default_docs()
    problems = []
    for doc in docs:
        try:
            text = doc.read_text()
        except OSError as e:
            problems.append(Problem(str(doc), 0, f"cannot read: {e.strerror}"))
            continue
        full = doc.resolve()
        name = str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(doc)
        problems += check_text(text, name, unbacked=doc.name == "README.md")
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{len(docs)} documents: every figure matches its committed result")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
