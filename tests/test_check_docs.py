"""The docs' figures against the committed results they name (afd.benchmarks.check_docs): the
repository's README.md and docs/*.md pass, and an edited number, a missing key, an uncommitted
file or a hand-typed figure fails."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from afd.benchmarks import check_docs

RESULT = {
    "command": "afd bench pipeline --steps 8",
    "runs": [
        {"m": 1, "k": 4, "tps": 2741.06, "speedup": 1.0, "bubble": {"attention": 0.567}},
        {"m": 2, "k": 4, "tps": 4343.1, "speedup": 1.5844, "bubble": {"attention": 0.251}},
        {"m": 1, "k": 1, "tps": 2000.0, "speedup": 1.0, "bubble": {"attention": 0.6}},
    ],
}
DOC = """# Results

<!-- results: r.json
each runs where k=4: | {m} | {tps:.0f} | {speedup:.2f}x | {bubble.attention:.0%} |
-->
| m | tokens/s | speedup | attention bubble |
|---|---|---|---|
| 1 | 2741 | 1.00x | 57% |
| 2 | 4343 | 1.58x | 25% |

<!-- results: r.json
m = 2 gave {runs[1].speedup:.2f}x over m = 1 with K = {runs[-1].k} rounds of {runs[0].tps:,.1f}
{runs[1].bubble.attention*1000:.1f} ms
-->
In that run m = 2 gave 1.58x over m = 1 with K = 1 rounds of 2,741.1 tokens/s (8 steps),
251.0 ms of bubble.

<!-- results: r.json
{command}
-->
```bash
python3 -m afd bench pipeline --steps 8
```
"""


@pytest.fixture
def repo(tmp_path):
    """A git checkout holding r.json, committed."""
    (tmp_path / "r.json").write_text(json.dumps(RESULT))
    git = ["git", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "r.json"], check=True)
    return tmp_path


def problems(text: str, root) -> list[str]:
    return [p.message for p in check_docs.check_text(text, "doc.md", root)]


def test_the_repository_docs_match_their_results():
    docs = check_docs.default_docs()
    assert any("<!-- results:" in d.read_text() for d in docs), "no figure is backed by a result"
    assert check_docs.main([]) == 0


def test_a_correct_doc_passes(repo):
    assert problems(DOC, repo) == []


@pytest.mark.parametrize(
    "old,new",
    [
        ("| 2 | 4343 | 1.58x | 25% |", "| 2 | 4343 | 1.59x | 25% |"),  # a table cell
        ("| 1 | 2741 |", "| 1 | 2742 |"),  # an integer cell
        ("25% |", "26% |"),
        ("gave 1.58x over", "gave 1.60x over"),  # a sentence
        ("of 2,741.1 tokens/s", "of 2,741.2 tokens/s"),
        ("251.0 ms", "251.1 ms"),  # a scaled field
        ("--steps 8\n```", "--steps 9\n```"),  # the command shown
    ],
)
def test_an_edited_figure_fails(repo, old, new):
    assert old in DOC
    found = problems(DOC.replace(old, new, 1), repo)
    assert len(found) == 1 and "r.json gives" in found[0], found


def test_a_hand_typed_figure_in_a_backed_block_fails(repo):
    text = DOC.replace("(8 steps),", "(8 steps, about 12.5% faster),")
    assert text != DOC
    assert problems(text, repo) == ["'12.5%' is not produced by the results comment's templates"]


def test_an_unbacked_measurement_outside_any_block_fails(repo):
    text = DOC + "\nOn a GPU the kernel reached 3015 GB/s, a 1.8x gain; `1.5x` in code is fine.\n"
    found = problems(text, repo)
    assert len(found) == 2 and all("no results comment backs it" in f for f in found), found


def test_missing_files_keys_and_uncommitted_results_fail(repo):
    assert problems(DOC.replace("results: r.json", "results: gone.json", 1), repo) == [
        "gone.json: no such file"
    ]
    found = problems(DOC.replace("{bubble.attention:.0%}", "{bubble.expert:.0%}"), repo)
    assert found == ["r.json: \"no 'bubble.expert' in the result\""]
    (repo / "new.json").write_text(json.dumps(RESULT))
    found = problems(DOC.replace("r.json", "new.json"), repo)
    assert found == ["new.json: not committed (git does not track it)"] * 3


def test_lookup_paths():
    assert check_docs.lookup(RESULT, "runs[-1].k") == 1
    assert check_docs.lookup(RESULT, "runs[1].bubble.attention") == 0.251
    for bad in ("runs[3].k", "runs.k", "nothing", "runs[0].m.x"):
        with pytest.raises(KeyError):
            check_docs.lookup(RESULT, bad)


def test_the_command_line_reports_problems(tmp_path, capsys):
    """In a README, a measured-looking figure outside every results block fails; other docs
    are checked where they are annotated."""
    readme, other = tmp_path / "README.md", tmp_path / "notes.md"
    for doc in (readme, other):
        doc.write_text("It ran at 12.5 tok/s.\n")
    assert check_docs.main([str(other)]) == 0
    assert check_docs.main([str(readme)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"README.md:1: '12.5 tok/s' looks measured", err[0])


def test_one_comment_may_name_several_files(repo):
    (repo / "s.json").write_text(json.dumps({"runs": [{"m": 7, "tps": 99.0}]}))
    subprocess.run(["git", "-C", str(repo), "add", "s.json"], check=True)
    text = """<!-- results: r.json
each runs where k=1: | {m} | {tps:.0f} |
results: s.json
each runs: | {m} | {tps:.0f} |
-->
| m | tokens/s |
|---|---|
| 1 | 2000 |
| 7 | 99 |
"""
    assert problems(text, repo) == []
    found = problems(text.replace("| 7 | 99 |", "| 7 | 98 |"), repo)
    assert len(found) == 1 and found[0].startswith("s.json gives '| 7 | 99 |'"), found
