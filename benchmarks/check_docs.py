"""Check that every measured figure in README.md and docs/*.md matches the committed result JSON it
names (docs/results.md describes the convention). Run: `python3 -m afd.benchmarks.check_docs`
(exit 1 and one line per problem when a figure is off, a file or key is missing, or a measured
figure stands unannotated).

A results comment names a JSON file (relative to the repository root) and holds templates:

    <!-- results: benchmarks/results/<machine>/<name>.json
    | {m} | {decode_tokens_per_s:.0f} | ...          one line, fields from the JSON
    each runs where num_scheduler_steps=4: | {m} |   one line per element of a list
    -->

A line `results: PATH` switches the file for the templates after it; `derive NAME: PATH ...`
makes a figure derived from several files (afd.benchmarks.derived: counts, ranges, best rows)
their data. Every rendered line must appear verbatim in the block that follows the comment (up to
the next blank line; runs of white space count as one space, so prose may wrap). Inside that
block, no other decimal number, percentage or `Nx` factor may stand; outside every block, none
may stand either (nor a throughput), except in the block after a `<!-- not measured: WHY -->`
comment (data-sheet values, defaults, tolerances). Result files are read as committed
(`git show HEAD:PATH`), so an uncommitted result cannot back a figure.
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

import yaml

from afd.benchmarks.derived import DERIVES

ROOT = Path(__file__).resolve().parent.parent
COMMENT = re.compile(r"<!--\s*results:\s*(?P<path>\S+)(?P<body>.*?)-->", re.S)
# a block of figures that are not measurements (data-sheet peaks, defaults, tolerances)
NOT_MEASURED = re.compile(r"<!--\s*not measured:\s*\S.*?-->", re.S)
FIELD = re.compile(r"\{(?P<path>[^{}:]+)(?::(?P<fmt>[^{}]*))?\}")
DERIVE = re.compile(r"derive\s+(?P<name>\w+):\s*(?P<paths>.+)")
EACH = re.compile(r"^each\s+(?P<path>[^\s:]+)(?:\s+where\s+(?P<key>[\w.]+)=(?P<value>[^:]+))?:\s?")
# a measured figure: a decimal number, a percentage or a factor like 2x (integers alone may be
# sizes, counts or flags)
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:%|x\b)|(?<![\w.])\d+\.\d+(?![\w.])")
# outside every results block: any such figure, and a throughput even when it is an integer
UNBACKED = re.compile(
    rf"(?<![\w.])\d[\d,.]*\s*(?:GB/s|TFLOP/s|tok/s|tokens/s|req/s)|{FIGURE.pattern}"
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
        derive = DERIVE.fullmatch(template)
        if derive:
            if derive["name"] not in DERIVES:
                raise KeyError(f"no derived figure {derive['name']!r} (afd.benchmarks.derived)")
            files = [load(path) for path in derive["paths"].split()]
            rel, data = f"derive {derive['name']}", DERIVES[derive["name"]](files)
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


def read_committed(rel: str, root: Path) -> str:
    """A file's text as committed at HEAD (`git show HEAD:rel`); the working copy when `root` is
    no git checkout. FileNotFoundError says whether it is missing or only uncommitted."""
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "show", f"HEAD:{rel}"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        r = None
    if r is not None and r.returncode == 0:
        return r.stdout.decode()
    exists = (root / rel).is_file()
    if r is None or b"not a git repository" in r.stderr:
        if exists:
            return (root / rel).read_text()
    elif exists:
        raise FileNotFoundError(f"{rel}: not committed (HEAD does not have it)")
    raise FileNotFoundError(f"{rel}: no such file")


def load_result(rel: str, root: Path) -> Any:
    """A committed result: JSON, or YAML for a plan (`.yaml`, `.yml`)."""
    text = read_committed(rel, root)
    try:
        return yaml.safe_load(text) if rel.endswith((".yaml", ".yml")) else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        kind = "YAML" if rel.endswith("ml") else "JSON"
        raise FileNotFoundError(f"{rel}: not {kind} ({e})") from None


def without_code(text: str) -> str:
    """`text` with its code (fenced or inline) blanked out, positions kept: examples in code are
    neither results comments nor figures."""
    blank = lambda c: re.sub(r"\S", " ", c.group())  # noqa: E731
    return re.sub(r"`[^`\n]+`", blank, re.sub(r"```.*?```", blank, text, flags=re.S))


def check_text(text: str, doc: str, root: Path = ROOT) -> list[Problem]:
    """Problems in one document's text: figures that differ from their committed results, and
    measured-looking figures outside every results block."""
    problems: list[Problem] = []
    covered: list[tuple[int, int]] = []
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    scan = without_code(text)
    for m in COMMENT.finditer(scan):
        where = line_of(m.start())
        start, end = following_block(text, m.end())
        covered.append((m.start(), end))  # reported once here, not again as unbacked figures
        first = m["path"]
        try:
            body = text[m.start("body") : m.end("body")]  # `scan` blanked inline code
            lines = render_lines(body, lambda rel: load_result(rel, root), first)
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
    for m in NOT_MEASURED.finditer(scan):
        covered.append((m.start(), following_block(text, m.end())[1]))
    outside = scan
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
        problems += check_text(text, name)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{len(docs)} documents: every figure matches its committed result")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
