"""The cluster secret (issue 22 item 2): --cluster-secret-file checked, one generated for a
one-node cluster, handed to children in the environment, never on a command line."""

from __future__ import annotations

import os

import pytest

from afd.comm import auth


@pytest.mark.parametrize(
    ("content", "error"),
    [(None, "cannot read"), ("", "is empty"), ("  \n", "is empty"), ("short", "at least 16")],
)
def test_secret_file_is_checked(tmp_path, content, error):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=error):
        auth.read_secret_file(str(path))


def test_secret_from_a_file_or_generated_reaches_children_by_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV, raising=False)
    auth.install_secret(None)
    generated = os.environ[auth.ENV]
    assert len(bytes.fromhex(generated)) == 32
    auth.install_secret(None)  # a child (or a second call) keeps the one it inherited
    assert os.environ[auth.ENV] == generated
    path = tmp_path / "secret"
    path.write_bytes(b"0123456789abcdef0123\n")
    auth.install_secret(str(path))
    assert auth.cluster_key() == b"0123456789abcdef0123"


def test_cli_rejects_a_bad_secret_file_and_nnodes_without_one(tmp_path, capsys):
    from afd.entrypoints.cli import main

    missing = str(tmp_path / "nope")
    assert main(["launch", "--cluster-secret-file", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot read --cluster-secret-file" in err
    assert main(["launch", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:1"]) == 2
    assert "--nnodes > 1 needs --cluster-secret-file" in capsys.readouterr().err
