"""The contract holds for a client that has only the documents: a real coordinator (the `lowband coordinator` CLI, in
its own process) serves a client written from proto/lowband/v1/coordinator.proto, docs/wire.md and docs/state.md
(tests/contract/spec_client.py), with stubs compiled from the .proto here. This module, like the client, imports
nothing from ``node`` or ``coordinator``."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from spec_client import SpecClient, State, compile_stubs, config_hash, frame

REPO = Path(__file__).resolve().parents[2]
TOKEN = "spec-join-token"
RUN_FILE = f"""
[run]
id = "spec"
task = "node.tasks.examples.shapes:shapes_task"
recipe = "sign-nesterov"
rounds = 4
seed = 3

[task]
channels = 2
size = 8
batch_size = 2
eval_size = 8

[recipe]
H = 1

[membership]
min_nodes = 1
max_nodes = 4
heartbeat_s = 1.0
lease_s = 60.0
join_token = "{TOKEN}"

[rounds]
initial_wait_s = 60
min_wait_s = 1
max_wait_s = 60
eval_every = 0
"""


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[str]:
    """A coordinator process on 127.0.0.1, port 0; yields the address it prints."""
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN_FILE)
    lowband = Path(sys.executable).with_name("lowband")
    log = (tmp_path / "coordinator.log").open("w")
    proc = subprocess.Popen([str(lowband), "coordinator", "--listen", "127.0.0.1:0", "--state-dir",
                             str(tmp_path / "state"), "--run", str(run_file)], stdout=subprocess.PIPE, stderr=log,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore
    try:
        address = ""
        while not address:
            line = lines.get(timeout=120)  # the coordinator prints its address once it serves
            if "listening on " in line:
                address = line.rsplit("listening on ", 1)[1].strip()
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_the_client_imports_nothing_of_lowband() -> None:
    """Checked on the source (other tests in the same session import ``node``, so sys.modules cannot tell)."""
    for path in (Path(__file__), Path(__file__).with_name("spec_client.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("node", "coordinator")], f"{path.name} imports {names}"


def _code(call: object, *args: object, **kw: object) -> grpc.RpcError:
    try:
        call(*args, **kw)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


@pytest.mark.timeout(300)
def test_a_client_from_the_spec_alone_joins_submits_collects_and_reads_the_state(coordinator: str,
                                                                               tmp_path: Path) -> None:
    pb, pb_grpc = compile_stubs(REPO / "proto", tmp_path / "stubs")
    client = SpecClient(coordinator, pb, pb_grpc, "spec-1", TOKEN)
    try:
        # -- GetRun: the version is checked; the config hash is reproduced from the JSON by the written rule
        err = _code(client.get_run, protocol_version=2)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "speaks 3" in err.details()
        run = client.get_run()
        assert run.protocol_version == 3 and run.run_id == "spec"
        config = json.loads(run.config_json)
        assert config_hash(config, run.task_fingerprint) == run.config_hash

        # -- a Join with every fingerprint wrong is refused naming each; then the real Join
        other = SpecClient(coordinator, pb, pb_grpc, "spec-2", TOKEN)
        other.run = run
        try:
            err = _code(other.join, config_hash="0" * 16, task_fingerprint="1" * 64, model_digest="2" * 16)
        finally:
            other.close()
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert all(part in err.details() for part in ("config hash 0000000000000000 vs", "task fingerprint 11111111",
                                                      "model digest 2222222222222222 vs"))
        joined = client.join()
        assert len(joined.node_id) == 32 and joined.first_round == 0 and joined.committed_rounds == 0

        # -- the state is safetensors with a JSON header; its fingerprint and model digest follow from its tensors
        chunk, blob = client.fetch_state()
        before = State.parse(blob)
        assert before.header["committed_rounds"] == 0 == chunk.committed_rounds
        assert before.fingerprint() == before.header["fingerprint"] == chunk.reference_fingerprint
        assert before.model_digest() == run.model_digest
        assert before.header["buffers"], "the shapes task has BatchNorm buffers: the frame carries an extra section"

        # -- a frame built from the spec: sign codec, the run's codec parameters, new buffer values, signed
        rng = np.random.default_rng(0)
        deltas = {n: rng.standard_normal(t.shape).astype(np.float32) for n, t in before.params()}
        buffers = {n: (t + 1).astype(t.dtype) for n, t, _ in before.buffers()}
        data = frame("spec", 0, "spec-1", config["recipe"]["codec"]["params"], before, deltas, buffers, client.key)
        signed = bytearray(data[4:-8])
        signed[-1] ^= 1  # a flipped signature bit under a valid digest: the signature is what refuses it
        tampered = data[:4] + bytes(signed) + hashlib.blake2b(bytes(signed), digest_size=8).digest()
        err = _code(client.submit, 0, tampered)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature does not verify" in err.details()
        accepted = client.submit(0, data)
        assert accepted.accepted and accepted.received_bytes == len(data) and accepted.round == 0

        # -- the round commits with this one member; its own frame is not sent back
        header, frames = client.collect(0)
        assert header.committed and list(header.members) == ["spec-1"] and list(header.payload_sizes) == [len(data)]
        assert list(header.member_keys) == [client.public] and frames == {}

        # -- the new state: the fingerprint the round announced, the buffers sent, the outer Nesterov step
        chunk, blob = client.fetch_state()
        after = State.parse(blob)
        assert after.header["committed_rounds"] == 1 == chunk.committed_rounds
        assert after.fingerprint() == header.reference_fingerprint == chunk.reference_fingerprint
        for name, value, _ in after.buffers():
            assert np.array_equal(value, buffers[name])  # one member: the mean (or max) of one
        outer = config["recipe"]["outer"]
        lr, mu = outer["lr"], outer["params"]["momentum"]
        for name, theta in after.params():
            delta = deltas[name].reshape(-1)
            aggregate = np.where(delta >= 0, 1.0, -1.0).astype(np.float32) * np.abs(delta).mean(dtype=np.float32)
            aggregate = aggregate.reshape(theta.shape)
            assert np.array_equal(after.tensors[f"outer/{name}/momentum_buffer"], aggregate)  # b starts at g
            expected = dict(before.params())[name] - np.float32(lr) * (aggregate + np.float32(mu) * aggregate)
            np.testing.assert_allclose(theta, expected, rtol=1e-6, atol=1e-7)
        client.leave()
    finally:
        client.close()
