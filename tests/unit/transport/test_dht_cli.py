"""``lowband run init|grant|key`` as an operator runs them (``node.cli.main`` in this process): a signed run file and
its authority key, a node's key, a grant in its workdir that the node's start-up checks accept — and the mistakes
refused with a message: another key as the authority, a grant for another name, a run file without [authority]."""
from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

from node.cli import main
from node.dht_cli import dht_identity
from node.errors import ConfigError
from node.identity import NodeKey
from node.runfile import build_run_file, load_run_file
from node.transport.dht_trust import RunAuthority

TEMPLATE = build_run_file(run_id="template", recipe="sign", rounds=20,
                          task_params={"size": "tiny", "batch_size": 2, "block_size": 32},
                          membership={"min_nodes": 2, "max_nodes": 4, "heartbeat_s": 0.5, "lease_s": 5.0})


def node_args(run: Path, workdir: Path, name: str | None) -> argparse.Namespace:
    return argparse.Namespace(run=str(run), workdir=str(workdir), name=name)


def test_init_grant_and_key_make_what_a_node_checks_at_start(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "template.toml"
    template.write_text(TEMPLATE)
    run = tmp_path / "run.toml"
    assert main(["run", "init", "--from", str(template), "--out", str(run), "--id", "cli-run"]) == 0
    authority_key = tmp_path / "run.authority.key"
    assert stat.S_IMODE(authority_key.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert "run cli-run: wrote" in out and "closed run" in out and "lowband run grant" in out
    run_file = load_run_file(run)
    section = RunAuthority.from_section(run_file.authority)
    assert section.public == NodeKey.load_or_create(tmp_path, authority_key.name).public and not section.open_run

    node = tmp_path / "node0"
    assert main(["run", "key", "--workdir", str(node)]) == 0
    public = capsys.readouterr().out.strip()
    assert bytes.fromhex(public) == NodeKey.load_or_create(node).public
    assert main(["run", "grant", "--run", str(run), "--authority-key", str(authority_key), "--public", public,
                 "--name", "gpu0"]) == 0
    printed = capsys.readouterr().out
    assert 'name = "gpu0"' in printed and public in printed
    assert main(["run", "grant", "--run", str(run), "--authority-key", str(authority_key), "--workdir", str(node),
                 "--name", "gpu0"]) == 0
    authority, key, grant, name = dht_identity(node_args(run, node, None), run_file)
    assert (authority, key.public, len(grant), name) == (section, bytes.fromhex(public), 64, "gpu0")

    with pytest.raises(ConfigError, match="but .*grants the name 'gpu0'"):
        dht_identity(node_args(run, node, "gpu1"), run_file)
    stranger = tmp_path / "stranger.key"
    NodeKey.load_or_create(tmp_path, stranger.name)
    assert main(["run", "grant", "--run", str(run), "--authority-key", str(stranger), "--workdir", str(node),
                 "--name", "gpu0"]) == 2  # a configuration error: not this run's authority
    assert "is not this run's authority" in capsys.readouterr().err
    assert main(["run", "init", "--from", str(template), "--out", str(tmp_path / "open.toml"), "--open",
                 "--authority-key", str(authority_key)]) == 0  # the same authority may sign another run
    assert RunAuthority.from_section(load_run_file(tmp_path / "open.toml").authority).open_run
    with pytest.raises(ConfigError, match="no \\[authority\\] section"):
        dht_identity(node_args(template, node, None), load_run_file(template))
