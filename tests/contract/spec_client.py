"""A lowband client written from the spec alone (proto/lowband/v1/coordinator.proto, docs/wire.md, docs/state.md):
it imports nothing of lowband's Python — no ``node``, no ``coordinator`` — only stubs compiled from the .proto,
grpc, msgpack, numpy, cryptography, safetensors and rfc8785 (the JSON canonicalization the config hash is defined
on). What it can do is what another language's client can do with the same documents.

Used by tests/contract/test_spec_client.py against a real coordinator process.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import secrets
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import grpc
import msgpack
import numpy as np
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load as load_safetensors

PROTOCOL_VERSION = 3
SERVICE = "/lowband.v1.Coordinator/"
CHUNK = 1 << 20
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
          "BOOL": "?"}  # the wire's and safetensors' dtype codes (BF16 has no numpy type: not needed here)


def compile_stubs(proto_root: Path, out: Path) -> tuple[ModuleType, ModuleType]:
    """(messages, services) compiled from ``proto_root``/lowband/v1/coordinator.proto into ``out`` with grpc_tools,
    then imported from there."""
    from grpc_tools import protoc  # the test dependency that compiles .proto files; nothing of lowband

    out.mkdir(parents=True, exist_ok=True)
    proto = proto_root / "lowband" / "v1" / "coordinator.proto"
    rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto)])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {proto}")
    # The stubs' package is the .proto's, lowband.v1. Installed lowband has a Python package named lowband too (the
    # Python API, ``import lowband``), which would shadow these; so the stubs are imported under a package object of
    # their own, which holds only ``out``: nothing of lowband's Python is imported, and lowband's package (if something
    # else in this process imported it) is put back afterwards.
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "lowband"}
    package = ModuleType("lowband")
    package.__path__ = [str(out / "lowband")]
    sys.modules["lowband"] = package
    try:
        return (importlib.import_module("lowband.v1.coordinator_pb2"),
                importlib.import_module("lowband.v1.coordinator_pb2_grpc"))
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "lowband"]:
            del sys.modules[name]
        sys.modules.update(saved)


# -- the spec's encodings --------------------------------------------------------------------------------------------
def signed_message(domain: str, *fields: Any) -> bytes:
    """What every signature covers: msgpack of [domain, *fields] (str as str, bytes as bin, integers)."""
    return msgpack.packb([domain, *fields], use_bin_type=True)


def config_hash(config: dict[str, Any], task_fingerprint: str) -> str:
    """docs/wire.md, "The config hash"."""
    d = {k: v for k, v in config.items() if k not in ("workers", "rounds", "run_id")}
    d["task_fingerprint"] = task_fingerprint
    return hashlib.sha256(rfc8785.dumps(d)).hexdigest()[:16]


@dataclass
class State:
    """A parsed state (docs/state.md): the lowband JSON header and every tensor as a numpy array."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]

    @classmethod
    def parse(cls, blob: bytes) -> "State":
        (n,) = struct.unpack("<Q", blob[:8])
        st_header = json.loads(blob[8:8 + n])
        header = json.loads(st_header["__metadata__"]["lowband"])
        if header.get("format") != "lowband-state" or header.get("version") != 1:
            raise ValueError(f"not a lowband state: {header.get('format')!r} v{header.get('version')!r}")
        dtypes = {k: v["dtype"] for k, v in st_header.items() if k != "__metadata__"}
        return cls(header, load_safetensors(blob), dtypes)

    def params(self) -> list[tuple[str, np.ndarray]]:
        return [(n, self.tensors[f"param/{n}"]) for n in self.header["params"]]

    def buffers(self) -> list[tuple[str, np.ndarray, str]]:
        return [(n, self.tensors[f"buffer/{n}"], self.dtypes[f"buffer/{n}"]) for n in self.header["buffers"]]

    def fingerprint(self) -> str:
        """sha256 over the parameters' raw bytes then the buffers', model order; 16 hex characters."""
        h = hashlib.sha256()
        for _, t in self.params():
            h.update(np.ascontiguousarray(t).tobytes())
        for _, t, _ in self.buffers():
            h.update(np.ascontiguousarray(t).tobytes())
        return h.hexdigest()[:16]

    def model_digest(self) -> str:
        text = ";".join(f"{n}:{'x'.join(map(str, t.shape))}" for n, t in self.params())
        if self.header["buffers"]:
            text += "|" + ";".join(f"{n}:{'x'.join(map(str, t.shape))}:{code}" for n, t, code in self.buffers())
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sign_payload(delta: np.ndarray) -> tuple[bytes, bytes]:
    """The sign codec with block 0 and f32 scales: (bits: one per element, x ≥ 0 → 1, packed least significant bit
    first; scales: the mean |x| of the whole tensor as one little-endian f32)."""
    flat = delta.astype("<f4").reshape(-1)
    bits = np.packbits(flat >= 0, bitorder="little").tobytes()
    scale = np.array([np.abs(flat).mean(dtype=np.float32)], dtype="<f4") if flat.size else np.zeros(0, "<f4")
    return bits, scale.tobytes()


def frame(run: str, round_: int, sender: str, params: dict[str, Any], state: State, deltas: dict[str, np.ndarray],
          buffers: dict[str, np.ndarray], key: Ed25519PrivateKey) -> bytes:
    """A signed sign-codec frame (docs/wire.md): b"LBSF" + msgpack body + signature + BLAKE2b-8(body + signature)."""
    body_map: dict[str, Any] = {
        "v": 1, "run": run, "round": round_, "sender": sender, "codec": "sign", "codec_v": 1, "params": params,
        "tensors": [[n, list(t.shape)] for n, t in state.params()],
        "buffers": [list(sign_payload(deltas[n])) for n, _ in state.params()],
    }
    if state.header["buffers"]:
        body_map["extra"] = [[n, code, list(t.shape), np.ascontiguousarray(buffers[n], DTYPES[code]).tobytes()]
                             for n, t, code in state.buffers()]
    body = msgpack.packb(body_map, use_bin_type=True)
    signature = key.sign(signed_message("lowband/frame/v1", run, round_, sender, hashlib.sha256(body).digest()))
    return b"LBSF" + body + signature + hashlib.blake2b(body + signature, digest_size=8).digest()


# -- the client ------------------------------------------------------------------------------------------------------
class SpecClient:
    """One member of a run, speaking the protocol as the .proto documents it."""

    def __init__(self, address: str, pb: ModuleType, pb_grpc: ModuleType, name: str, token: str = "") -> None:
        self.pb, self.name, self.token = pb, name, token
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.node_id = ""
        self.run: Any = None

    def close(self) -> None:
        self.channel.close()

    def _metadata(self, method: str, digest: bytes, extra: tuple[tuple[str, Any], ...] = ()) -> list[tuple[str, Any]]:
        ts, nonce = int(time.time() * 1000), secrets.token_hex(8)
        sig = self.key.sign(signed_message("lowband/rpc/v1", SERVICE + method, self.node_id, ts, nonce, digest))
        md = [("lowband-node-id", self.node_id), ("lowband-ts", str(ts)), ("lowband-nonce", nonce),
              ("lowband-sig-bin", sig), *extra]
        if not self.node_id:
            md.append(("lowband-key-bin", self.public))
        return md

    def get_run(self, protocol_version: int = PROTOCOL_VERSION) -> Any:
        self.run = self.stub.GetRun(self.pb.GetRunRequest(protocol_version=protocol_version, read_token=self.token),
                                    timeout=30)
        return self.run

    def join(self, **override: Any) -> Any:
        r = self.run
        ts = int(time.time() * 1000)
        fields: dict[str, Any] = dict(
            node_name=self.name, protocol_version=PROTOCOL_VERSION, config_json=r.config_json,
            config_hash=r.config_hash, task_fingerprint=r.task_fingerprint, model_digest=r.model_digest,
            capabilities=["lang=spec"], join_token=self.token, public_key=self.public, timestamp_ms=ts,
            signature=self.key.sign(signed_message("lowband/join/v1", r.run_id, self.name, self.public, ts)))
        fields.update(override)
        out = self.stub.Join(self.pb.JoinRequest(**fields), timeout=30)
        self.node_id = out.node_id
        return out

    def fetch_state(self) -> tuple[Any, bytes]:
        """(the last StateChunk, the whole state's bytes)."""
        request = self.pb.FetchStateRequest(node_id=self.node_id, offset=0,
                                            join_token="" if self.node_id else self.token)
        md = self._metadata("FetchState", hashlib.sha256(request.SerializeToString()).digest())
        buf, last = bytearray(), None
        for chunk in self.stub.FetchState(request, metadata=md, timeout=60):
            assert chunk.offset == len(buf), "state chunks arrive in order"
            buf += chunk.data
            last = chunk
        assert last is not None and len(buf) == last.total_size
        return last, bytes(buf)

    def submit(self, round_: int, data: bytes) -> Any:
        md = self._metadata("Submit", hashlib.sha256(msgpack.packb([round_, len(data)])).digest(),
                            (("lowband-submit", f"{round_}:{len(data)}"),))

        def chunks() -> Iterator[Any]:
            for off in range(0, len(data), CHUNK):
                yield self.pb.SubmitChunk(node_id=self.node_id, round=round_, offset=off, total_size=len(data),
                                          data=data[off:off + CHUNK], train_loss=float("nan"))
        return self.stub.Submit(chunks(), metadata=md, timeout=60)

    def collect(self, round_: int, wait_ms: int = 30_000) -> tuple[Any, dict[int, bytes]]:
        """(the header, member index → that member's frame) of a committed round."""
        request = self.pb.CollectRequest(node_id=self.node_id, round=round_, wait_ms=wait_ms, submitted=True)
        md = self._metadata("Collect", hashlib.sha256(request.SerializeToString()).digest())
        header, frames = None, {}
        for chunk in self.stub.Collect(request, metadata=md, timeout=wait_ms / 1000 + 60):
            if chunk.WhichOneof("part") == "header":
                header = chunk.header
            else:
                piece = chunk.piece
                got = frames.setdefault(piece.member, b"")
                assert piece.offset == len(got)
                frames[piece.member] = got + piece.data
        assert header is not None
        return header, frames

    def leave(self) -> None:
        request = self.pb.LeaveRequest(node_id=self.node_id, reason="spec client done")
        self.stub.Leave(request, metadata=self._metadata("Leave", hashlib.sha256(request.SerializeToString()).digest()),
                        timeout=30)
