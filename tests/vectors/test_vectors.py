"""The checked-in wire vectors are what lowband makes today, byte for byte, and they read back as docs/wire.md says."""
from __future__ import annotations

import hashlib
import json

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from node import wire
from node.compress import make_codec
from node.config import run_config_from_dict
from node.keyring import KeyRing
from vector_cases import CASES, CONFIG, HERE, MODEL, RUN, ROUND, SENDER, build

BUILT = build()
MANIFEST = json.loads((HERE / "manifest.json").read_text())


@pytest.mark.parametrize("file", sorted(BUILT))
def test_regenerated_vectors_equal_the_checked_in_bytes(file: str) -> None:
    assert (HERE / file).read_bytes() == BUILT[file], (
        f"tests/vectors/{file} differs from what lowband makes now: if the format changed on purpose, rewrite the "
        "vectors (tests/vectors/vector_cases.py --write) and say so in docs/wire.md")


def test_every_vector_file_is_in_the_manifest() -> None:
    on_disk = {p.name for p in HERE.glob("*.frame")}
    assert on_disk == {v["file"] for v in MANIFEST["vectors"]} == {f"{c[0]}.frame" for c in CASES}


@pytest.mark.parametrize("vector", MANIFEST["vectors"], ids=lambda v: v["name"])
def test_each_frame_unpacks_and_decodes_to_the_manifest_values(vector: dict) -> None:
    data = (HERE / vector["file"]).read_bytes()
    assert len(data) == vector["size"] and hashlib.sha256(data).hexdigest() == vector["sha256"]
    codec = make_codec(vector["codec"], vector["params"])
    spec = [wire.TensorSpec(n, tuple(make().shape)) for n, make in MODEL.items()]
    extra = [wire.ExtraSpec(e["name"], tuple(e["shape"]), wire.DTYPE_CODES[e["dtype"]]) for e in vector.get("extra", [])]
    keys = KeyRing({SENDER: bytes.fromhex(MANIFEST["signing_key"]["public"])}) if vector["signed"] else None
    env = wire.unpack(data, codec, spec, RUN, ROUND, extra_spec=extra, sender=SENDER, keys=keys)
    for t in spec:
        got = codec.decode(env.tensors[t.name], t.shape)
        assert got.contiguous().view(torch.uint8).numpy().tobytes().hex() == vector["decoded_f32le"][t.name]
    for e in vector.get("extra", []):
        assert env.extra[e["name"]].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex() == e["data"]


@pytest.mark.parametrize("vector", MANIFEST["vectors"], ids=lambda v: v["name"])
def test_each_frame_reads_from_the_spec_alone(vector: dict) -> None:
    """What docs/wire.md says, checked with msgpack, hashlib and cryptography only: magic, BLAKE2b-8 digest, the
    signature over its message, the envelope's fields and each buffer's bytes."""
    data = (HERE / vector["file"]).read_bytes()
    digest = data[-8:]
    if vector["signed"]:
        assert data[:4] == b"LBSF"
        body, signature = data[4:-72], data[-72:-8]
        assert hashlib.blake2b(body + signature, digest_size=8).digest() == digest
        message = msgpack.packb(["lowband/frame/v1", RUN, ROUND, SENDER, hashlib.sha256(body).digest()],
                                use_bin_type=True)
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(MANIFEST["signing_key"]["public"]))
        public.verify(signature, message)  # raises InvalidSignature when it does not hold
    else:
        assert data[:4] == b"LBW1"
        body = data[4:-8]
        assert hashlib.blake2b(body, digest_size=8).digest() == digest
    env = msgpack.unpackb(body, raw=False)
    fields = ["v", "run", "round", "sender", "codec", "codec_v", "params", "tensors", "buffers"]
    assert list(env) == fields + (["extra"] if "extra" in vector else [])  # the writer's key order
    assert (env["v"], env["run"], env["round"], env["sender"]) == (1, RUN, ROUND, SENDER)
    assert (env["codec"], env["codec_v"], env["params"]) == (vector["codec"], vector["codec_v"], vector["params"])
    assert env["tensors"] == [[m["name"], m["shape"]] for m in MANIFEST["model"]]
    for (name, _), bufs in zip(env["tensors"], env["buffers"]):
        assert [b.hex() for b in bufs] == list(vector["buffers"][name].values())
    if "extra" in vector:
        assert env["extra"] == [[e["name"], e["dtype"], e["shape"], bytes.fromhex(e["data"])] for e in vector["extra"]]


def test_the_signing_key_is_the_published_rfc8032_test_key() -> None:
    """The vectors' key is RFC 8032 §7.1 TEST 1, whose public key the RFC prints: public test material."""
    assert MANIFEST["signing_key"]["public"] == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def test_config_hash_vector() -> None:
    vector = json.loads((HERE / "config_hash.json").read_text())
    canonical = vector["canonical"].encode()
    assert hashlib.sha256(canonical).hexdigest()[:16] == vector["config_hash"]
    # the rule's visible consequences: sorted keys, no whitespace, 1.0 written as 1, UTF-8 kept as is
    assert canonical.startswith(b'{"recipe":{"H":12,') and b'"lr":1,' in canonical and b'"eps":1e-30' in canonical
    assert "données — 数据".encode() in canonical and b" " not in canonical.replace("données — 数据".encode(), b"")
    # the configuration's own hash, through lowband's RunConfig, and through the JSON a coordinator hands out
    cfg = run_config_from_dict(CONFIG)
    assert cfg.config_hash(vector["task_fingerprint"]) == vector["config_hash"]
    assert run_config_from_dict(json.loads(json.dumps(cfg.to_dict()))).config_hash(vector["task_fingerprint"]) \
        == vector["config_hash"]
