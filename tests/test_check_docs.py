"""The docs' figures against the committed results they name (afd.benchmarks.check_docs): the
repository's README.md and docs/*.md pass, and an edited number, a missing key, an uncommitted
file or a hand-typed figure fails."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from afd.benchmarks import check_docs, derived

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


def commit(root, *paths: str) -> None:
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    if not (root / ".git").exists():
        subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", *paths], check=True)
    subprocess.run([*git, "commit", "-qm", "results"], check=True)


@pytest.fixture
def repo(tmp_path):
    """A git checkout holding r.json, committed."""
    (tmp_path / "r.json").write_text(json.dumps(RESULT))
    commit(tmp_path, "r.json")
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
    assert found == ["new.json: not committed (HEAD does not have it)"] * 3


def test_an_uncommitted_edit_of_a_result_and_its_figure_fails(repo):
    """The figures are checked against the result as committed, not the working copy."""
    edited = json.loads(json.dumps(RESULT))
    edited["runs"][0]["tps"] = 2742.0
    (repo / "r.json").write_text(json.dumps(edited))
    found = problems(DOC.replace("| 1 | 2741 |", "| 1 | 2742 |"), repo)
    assert len(found) == 1 and "r.json gives '| 1 | 2741 |" in found[0], found
    commit(repo, "r.json")  # now the unedited text is what disagrees with HEAD
    assert any("r.json gives '| 1 | 2742 |" in p for p in problems(DOC, repo))


def test_lookup_paths():
    assert check_docs.lookup(RESULT, "runs[-1].k") == 1
    assert check_docs.lookup(RESULT, "runs[1].bubble.attention") == 0.251
    for bad in ("runs[3].k", "runs.k", "nothing", "runs[0].m.x"):
        with pytest.raises(KeyError):
            check_docs.lookup(RESULT, bad)


def test_the_command_line_reports_problems(tmp_path, capsys):
    """In the README and in other docs alike, a measured-looking figure outside every results
    block fails."""
    readme, other = tmp_path / "README.md", tmp_path / "notes.md"
    for doc in (readme, other):
        doc.write_text("It ran at 12.5 tok/s.\n")
    assert check_docs.main([str(other)]) == 1
    assert check_docs.main([str(readme)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and re.search(r"README.md:1: '12.5 tok/s' looks measured", err[1])


def test_one_comment_may_name_several_files(repo):
    (repo / "s.json").write_text(json.dumps({"runs": [{"m": 7, "tps": 99.0}]}))
    commit(repo, "s.json")
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


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """A git copy of the repository's docs and result files, committed."""
    root = tmp_path_factory.mktemp("copy")
    for doc in check_docs.default_docs():
        rel = doc.relative_to(check_docs.ROOT)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(doc, root / rel)
    for result in (check_docs.ROOT / "benchmarks" / "results").rglob("*"):
        if result.suffix in (".json", ".yaml"):
            rel = result.relative_to(check_docs.ROOT)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(result, root / rel)
    commit(root, ".")
    return root


def blocks(text: str, root) -> list[tuple[int, int, list[str]]]:
    """[start, end) of each results block in `text` and the lines its templates render."""
    out = []
    for m in check_docs.COMMENT.finditer(check_docs.without_code(text)):
        start, end = check_docs.following_block(text, m.end())
        body = text[m.start("body") : m.end("body")]
        lines = check_docs.render_lines(body, lambda rel: check_docs.load_result(rel, root), m[1])
        out.append((start, end, [line for line, _ in lines]))
    return out


def bump(block: str, line: str) -> str:
    """`block` with the first digit of the rendered `line` changed (the line may wrap)."""
    m = re.search(r"\s+".join(map(re.escape, line.split())), block)
    at = m.start() + re.search(r"\d", m.group()).start()
    return block[:at] + str((int(block[at]) + 1) % 10) + block[at + 1 :]


@pytest.mark.parametrize("doc", [d.name for d in check_docs.default_docs()])
def test_an_edited_figure_fails_in_every_doc(copy, doc):
    """In each of README.md and docs/*.md, changing a figure of any results block fails; a doc
    without results blocks fails on a hand-typed figure."""
    rel = "README.md" if doc == "README.md" else f"docs/{doc}"
    text = (copy / rel).read_text()
    assert check_docs.check_text(text, rel, copy) == []
    found = blocks(text, copy)
    if not found:
        assert check_docs.check_text(text + "\nIt ran 12.5% faster.\n", rel, copy)
        return
    for start, end, lines in found:
        block = text[start:end]
        line = next((x for x in lines if re.search(r"\d", x)), None)
        if line is None:
            continue  # a block with no figure (a command without numbers): nothing to edit
        edited = text[:start] + bump(block, line) + text[end:]
        problems = check_docs.check_text(edited, rel, copy)
        assert problems and "gives" in problems[0].message, (rel, line, problems)


def pipeline_result(model: str, errors: list[float], tps: list[float], colocated: list[float]):
    """A pipeline result with 1A1F runs m = 1, 2 at K = 1 and colocated rows at K = 1, 4."""
    runs = [
        {"m": m, "num_scheduler_steps": 1, "decode_tokens_per_s": t, "prediction_error": e,
         "attention_expert_balance": 4.0 / m, "bubble_fraction": {"attention": 0.1, "expert": b},
         "predicted": {"context": 63.4}}
        for m, t, e, b in zip((1, 2), tps, errors, (0.7, 0.5), strict=True)
    ]  # fmt: skip
    rows = [
        {"num_scheduler_steps": k, "decode_tokens_per_s": t, "prediction_error": -0.3,
         "predicted": {"context": 384.0}}
        for k, t in zip((1, 4), colocated, strict=True)
    ]  # fmt: skip
    topology = {"attention_workers": 1, "expert_workers": 1}
    return {"model": model, "batch_size_per_attention_worker": 47, "runs": runs,
            "topology": topology, "colocated": rows}  # fmt: skip


def test_derived_accuracy_and_choice_figures():
    a = pipeline_result("a", [0.1, -0.25], [400.0, 300.0], [600.0, 590.0])
    b = pipeline_result("b", [0.2, 0.05], [500.0, 550.0], [520.0, 540.0])
    acc = derived.accuracy([a, b])
    assert (acc["within_20pct"], acc["rows"]) == (3, 8)  # |0.2| counts, the colocated -0.3 not
    assert acc["models"]["a"]["error"] == {"min": -0.3, "max": 0.1}
    assert acc["models"]["a"]["by_m"]["2"] == {"min": -0.25, "max": -0.25}
    assert (acc["k_text"], acc["contexts_text"], acc["m"]) == (
        "1 and 4",
        "63 and 384",
        {"min": 1, "max": 2},
    )
    plan_a = {"num-attention-workers": 0, "num-scheduler-steps": 4}
    plan_b = {"num-attention-workers": 1, "num-micro-batches": 2, "num-scheduler-steps": 1}
    pick = derived.choice([plan_a, a, plan_b, b])
    first, second = pick["models"]
    assert (
        first["plan"]["label"] == "colocated, K = 4"
        and first["best"]["label"] == "colocated, K = 1"
    )
    assert first["plan_over_best"] == pytest.approx(590 / 600)
    assert second["plan"]["label"] == "1A1F, m = 2, K = 1" and second["plan_over_best"] == 1.0
    assert pick["configurations"] == 4 and pick["shortfall"]["max"] == pytest.approx(10 / 600)
    assert first["best_disaggregated"]["decode_tokens_per_s"] == 400.0
    balance = first["balance"]
    assert balance["light_side"] == "expert" and balance["heavier_factor"] == {
        "min": 2.0,
        "max": 4.0,
    }
    assert balance["light_bubble_m2_up"] == {"min": 0.5, "max": 0.5}
    with pytest.raises(KeyError, match="no row for the plan"):
        derived.choice([{"num-attention-workers": 1, "num-micro-batches": 3}, a])


def test_derived_side_errors_split_at_one_micro_batch():
    def run(m, attention, expert):
        return {"m": m, "attention": {"compute_s": attention}, "expert": {"compute_s": expert},
                "predicted": {"stages_s": {"attention": 0.1, "expert": 0.2}}}  # fmt: skip

    got = derived.sides([{"runs": [run(1, 0.08, 0.3), run(2, 0.12, 0.2), run(3, 0.11, 0.25)]}])
    assert got["attention"]["m1"] == pytest.approx({"min": -0.2, "max": -0.2})
    assert got["attention"]["m2_up"] == pytest.approx({"min": 0.1, "max": 0.2})
    assert got["expert"]["m2_up"] == pytest.approx({"min": 0.0, "max": 0.25})


def test_a_derived_figure_is_checked_like_any_other(repo):
    (repo / "p.json").write_text(
        json.dumps(pipeline_result("a", [0.1, -0.25], [4.0, 3.0], [6.0, 5.0]))
    )
    commit(repo, "p.json")
    text = """<!-- results: p.json
derive accuracy: p.json
{within_20pct} of the {rows} rows are within ±{band:.0%}
-->
1 of the 4 rows are within ±20%.
"""
    assert problems(text, repo) == []
    assert len(problems(text.replace("1 of the 4", "2 of the 4"), repo)) == 1
    found = problems(text.replace("derive accuracy", "derive nothing"), repo)
    assert found == ["p.json: \"no derived figure 'nothing' (afd.benchmarks.derived)\""]


def test_a_block_marked_not_measured_may_hold_figures(repo):
    """Data-sheet values and defaults stand after `<!-- not measured: ... -->`; the next block
    is checked again."""
    text = """<!-- not measured: data-sheet peaks -->
| H100 | 3.35 TB/s | 0.7 of it |

It ran 12.5% faster.
"""
    assert problems(text, repo) == ["'12.5%' looks measured but no results comment backs it"]
    assert problems(text.replace("not measured", "measured"), repo) == [
        "'3.35' looks measured but no results comment backs it",
        "'0.7' looks measured but no results comment backs it",
        "'12.5%' looks measured but no results comment backs it",
    ]
