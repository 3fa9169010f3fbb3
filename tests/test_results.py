"""Results record their provenance (afd.results): a result measured on uncommitted
code is refused inside the checkout unless --allow-dirty, which the file then records."""

from __future__ import annotations

import json
import subprocess

import pytest

from afd import results


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout with a committed `benchmarks/` folder: the checkout results.py reads."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "code.py").write_text("x = 1\n")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "code"], check=True)
    monkeypatch.setattr(results, "_CHECKOUT", root)
    return root


def write(path, **kw):
    return json.loads(results.write_result("r", {"value": 1}, path=path, argv=["bench"], **kw)
                      .read_text())  # fmt: skip


def test_a_clean_checkout_records_its_commit(checkout):
    record = write(checkout / "benchmarks" / "results" / "r.json")
    assert len(record["commit"]) == 40 and "allow_dirty" not in record
    assert record["command"] == "afd bench" and record["value"] == 1


def test_a_dirty_checkout_is_refused_unless_allowed(checkout, tmp_path):
    (checkout / "benchmarks" / "code.py").write_text("x = 2\n")
    inside = checkout / "benchmarks" / "results" / "r.json"
    with pytest.raises(ValueError, match="uncommitted changes.*--allow-dirty"):
        write(inside)
    assert not inside.exists()
    for record in (
        write(inside, allow_dirty=True),
        json.loads(
            results.write_result("r", {}, path=inside, argv=["bench", "--allow-dirty"]).read_text()
        ),
    ):
        assert record["commit"].endswith("-dirty") and record["allow_dirty"] is True
    # outside the checkout (a test's tmp folder) nothing can be committed: -dirty is recorded
    record = write(tmp_path / "elsewhere" / "r.json")
    assert record["commit"].endswith("-dirty") and "allow_dirty" not in record


def test_a_changed_result_file_is_no_change_of_code(checkout):
    """One run's new result does not make the next run's code look changed."""
    inside = checkout / "benchmarks" / "results" / "r.json"
    write(inside)
    subprocess.run(["git", "-C", str(checkout), "add", "."], check=True)
    subprocess.run(
        ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t", "commit",
         "-qm", "r"], check=True,
    )  # fmt: skip
    inside.write_text("{}")  # a re-measured result, not committed yet
    assert not write(checkout / "benchmarks" / "results" / "s.json")["commit"].endswith("-dirty")


def test_the_cli_refuses_before_measuring(checkout, capsys):
    """`afd bench pipeline` stops at once with a one-line error (exit 2), not after its run."""
    from afd.entrypoints import cli

    (checkout / "benchmarks" / "code.py").write_text("x = 2\n")
    argv = ["bench", "pipeline", "--model", "no-such-model", "--steps", "1"]
    argv += ["--output-dir", str(checkout / "benchmarks" / "results")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uncommitted changes" in err[0] and "--allow-dirty" in err[0]


def test_payload_keys_may_not_hide_the_provenance(tmp_path):
    with pytest.raises(ValueError, match="allow_dirty"):
        results.write_result("r", {"allow_dirty": False}, path=tmp_path / "r.json")
