"""The state format (docs/state.md): a safetensors file with lowband's JSON header, readable without torch or
lowband, refused with a clear message when it is anything else — a PyTorch pickle, another safetensors file, a
truncated or corrupted one, one of another run or model — and loaded all or nothing. Also issue 15, input 4: the
randomized sign's generator is in the state, so a joiner matches the run after the next round. Harness:
models_harness.py."""
from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load, save

from node.train import state_file
from node.train.state_file import StateFormatError
from node.train.worker import Worker
from models_harness import Cluster, run_config, shapes


def trained(recipe: str = "sign", rounds: int = 2, **overrides) -> Cluster:  # type: ignore[no-untyped-def]
    cl = Cluster(run_config(recipe, overrides=overrides or None), shapes())
    for r in range(rounds):
        cl.round(r)
    return cl


def read_without_torch(blob: bytes) -> tuple[dict, dict[str, tuple[str, list[int], bytes]]]:
    """What a reader in another language does: 8-byte little-endian header length, JSON, raw little-endian bytes."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = json.loads(header.pop("__metadata__")["lowband"])
    data = blob[8 + n:]
    return meta, {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}


def test_the_state_is_a_safetensors_file_with_a_json_header() -> None:
    w = trained().workers[0]
    blob = w.reference.to_bytes()
    meta, tensors = read_without_torch(blob)
    assert meta["format"] == "lowband-state" and meta["version"] == 1 and meta["kind"] == "reference"
    assert meta["committed_rounds"] == 2 and meta["fingerprint"] == w.fingerprint()
    assert meta["params"] == w.names and meta["buffers"] == w.reference.buffer_names
    assert meta["run"]["run_id"] == w.cfg.run_id and meta["outer"]["name"] == "sign_momentum"
    dtype, shape, raw = tensors["param/conv1.weight"]
    assert dtype == "F32" and shape == [4, 3, 3, 3]
    assert struct.unpack(f"<{len(raw) // 4}f", raw)[0] == float(w.ref[w.names.index("conv1.weight")].reshape(-1)[0])
    assert tensors["buffer/bn1.num_batches_tracked"][0] == "I64"
    assert {k for k in tensors if k.startswith("outer/")} == {f"outer/{n}/exp_avg" for n in w.names}
    assert set(load(blob)) == set(tensors)  # and any safetensors reader takes it


def test_the_randomized_sign_generator_travels_with_the_state_so_a_joiner_matches() -> None:
    overrides = {"outer.sign_mode": "randomized"}
    cl = trained("dsm", **overrides)
    blob = cl.workers[0].reference.to_bytes()
    assert "outer.extra/generator" in read_without_torch(blob)[1]
    joiner = Worker("late", cl.cfg, cl.task, 3, 4)
    joiner.adopt_global_state(blob)
    cl.workers.append(joiner)
    cl.links.append(cl.hub.connect("late"))
    for r in (2, 3):
        cl.round(r)
        assert len(cl.prints()) == 1, r  # c551f521… vs 6a787a08… before the generator was in the state


def _refused(blob: bytes, needle: str) -> None:
    w = Worker("x", run_config("sign"), shapes(), 0, 1)
    before = w.fingerprint()
    with pytest.raises(StateFormatError, match=needle):
        w.adopt_global_state(blob)
    assert w.fingerprint() == before and w.reference.committed_rounds == 0  # nothing changed


def test_a_pytorch_pickle_is_refused_as_such() -> None:
    w = trained().workers[0]
    buf = io.BytesIO()
    torch.save({"committed_rounds": 2, "names": w.names, "tensors": list(w.ref)}, buf)  # the old format
    _refused(buf.getvalue(), "zip archive .*torch.save")
    _refused(b"\x80\x04" + b"\0" * 64, "pickle")
    _refused(b"", "too short")


def test_another_safetensors_file_is_refused() -> None:
    _refused(save({"w": torch.ones(3)}), "without lowband's header")
    _refused(save({"w": torch.ones(3)}, metadata={"lowband": json.dumps({"format": "other"})}), "format")
    _refused(save({"w": torch.ones(3)}, metadata={"lowband": json.dumps({"format": "lowband-state", "version": 9})}),
             "version 9")


def _rewrite(blob: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    """Parse with the reference reader, change header or tensors, write again (with a fresh digest)."""
    sf = state_file.parse(blob)
    header = {k: v for k, v in sf.header.items() if k not in ("format", "version", "tensors_sha256")}
    tensors = {k: sf.tensor(k) for k in sf.entries}
    edit(header, tensors)
    return state_file.dumps(tensors, header)


@pytest.mark.parametrize("edit, needle", [
    (lambda h, t: h.__setitem__("kind", "checkpoint"), "is a 'checkpoint', expected a 'reference'"),
    (lambda h, t: h["run"].__setitem__("run_id", "other"), "for run 'other'"),
    (lambda h, t: h["run"]["recipe"].__setitem__("H", 99), "another recipe"),
    (lambda h, t: h["params"].pop(), "different tensors"),
    (lambda h, t: h.__setitem__("committed_rounds", -1), "committed_rounds"),
    (lambda h, t: h.__setitem__("fingerprint", "0" * 16), "fingerprint mismatch"),
    (lambda h, t: t.__setitem__("param/head.bias", torch.zeros(5)), "expected torch.float32 \\[4\\]"),
    (lambda h, t: t.__setitem__("param/head.bias", torch.zeros(4, dtype=torch.float64)), "float64"),
    (lambda h, t: t.__setitem__("buffer/bn1.running_var", torch.full((4,), float("inf"))), "non-finite"),
    (lambda h, t: t.pop("buffer/bn2.running_mean"), "no tensor 'buffer/bn2.running_mean'"),
    (lambda h, t: t.__setitem__("param/extra", torch.zeros(1)), "does not have"),
    (lambda h, t: t.__setitem__("outer/head.bias/exp_avg", torch.zeros(7)), "optimizer state"),
    (lambda h, t: t.__setitem__("outer/nothing/exp_avg", torch.zeros(1)), "not optimizer state"),
    (lambda h, t: t.__setitem__("outer/head.bias/bad key", torch.zeros(4)), "not optimizer state"),
    (lambda h, t: t.__setitem__("outer/head.bias/exp_avg", torch.full((4,), float("nan"))), "non-finite"),
])
def test_a_state_of_another_run_or_model_or_with_bad_values_is_refused(edit, needle: str) -> None:  # type: ignore[no-untyped-def]
    blob = trained(rounds=1).workers[0].reference.to_bytes()
    _refused(_rewrite(blob, edit), needle)


def test_structure_errors_are_refused_before_anything_is_allocated() -> None:
    blob = bytearray(trained(rounds=1).workers[0].reference.to_bytes())
    n = struct.unpack("<Q", blob[:8])[0]
    _refused(bytes(blob[:-1]), "outside|cover|sha256")  # truncated
    _refused(struct.pack("<Q", 1 << 40) + bytes(blob[8:]), "not a safetensors file|lowband reads only")
    header = json.loads(blob[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4  # overlap with the next tensor
    raw = json.dumps(header).encode()
    _refused(struct.pack("<Q", len(raw)) + raw + bytes(blob[8 + n:]), "bytes for|overlap|outside")
    flipped = bytearray(blob)
    flipped[-3] ^= 0x40
    _refused(bytes(flipped), "tensors_sha256")


@pytest.fixture(scope="module")
def state() -> tuple[bytes, str]:
    w = trained(rounds=1).workers[0]
    return w.reference.to_bytes(), w.fingerprint()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_damage_is_refused_or_loads_the_identical_state(state: tuple[bytes, str], data: st.DataObject) -> None:
    """A byte flipped or the file cut anywhere: refused with StateFormatError, never another exception or a partly
    loaded replica (a flip may hit JSON whitespace or padding, which changes nothing: then the state loads)."""
    blob, fingerprint = state
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(blob) - 1))
        damaged = blob[:i] + bytes([blob[i] ^ data.draw(st.integers(1, 255))]) + blob[i + 1:]
    else:
        damaged = blob[:data.draw(st.integers(0, len(blob) - 1))]
    w = Worker("x", run_config("sign"), shapes(), 0, 1)
    before = w.fingerprint()
    try:
        w.adopt_global_state(damaged)
    except StateFormatError:
        assert w.fingerprint() == before and w.reference.committed_rounds == 0
        return
    assert w.fingerprint() == fingerprint
