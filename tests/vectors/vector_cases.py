"""The wire test vectors (docs/wire.md): fixed input tensors → the exact frame lowband's codecs and envelope make of
them, per codec, plus one signed frame and the config hash of one fixed configuration.

``build()`` computes every file of tests/vectors/ from lowband's own code; test_vectors.py compares them with the
checked-in ones byte for byte. After a deliberate change of the format, rewrite them with

    .venv/bin/python tests/vectors/vector_cases.py --write

and say in the commit why the bytes changed (another implementation's vectors change with them).

Inputs are chosen so that every implementation that follows the spec gets the same bytes: values are small dyadic
fractions (every sum and mean the codecs take is exact in fp32, whatever the order), and no two magnitudes tie where a
top-k chooses. The one exception is dct_topk, whose coefficients come from an fp32 matrix product: another
implementation may differ in the last bit before the f16 rounding (docs/wire.md says how to compare).
"""
from __future__ import annotations

import hashlib
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node import wire
from node.compress import make_codec
from node.config import canonical_config, config_hash_of
from node.identity import NodeKey

HERE = Path(__file__).resolve().parent
RUN, ROUND, SENDER = "vectors", 7, "w1"
#: RFC 8032 §7.1 TEST 1: a published ed25519 test key. Public test material: it signs only test vectors.
TEST_KEY_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
TASK_FINGERPRINT = "00" * 32


def weight() -> torch.Tensor:
    """(4, 6) fp32: ±p/16 for p = 7i mod 24 (distinct magnitudes, one zero), negative where i mod 3 = 1."""
    return torch.tensor([(-1 if i % 3 == 1 else 1) * ((7 * i) % 24) / 16 for i in range(24)],
                        dtype=torch.float32).reshape(4, 6)


def bias() -> torch.Tensor:
    """(6,) fp32: ±q/32 for q = 5i mod 6 + 1, negative for odd i."""
    return torch.tensor([(-1 if i % 2 else 1) * ((5 * i) % 6 + 1) / 32 for i in range(6)], dtype=torch.float32)


MODEL = {"layer.weight": weight, "layer.bias": bias}
#: the model's buffers, for the one vector with an ``extra`` section
BUFFERS = {"bn.running_mean": torch.tensor([0.5, -0.25], dtype=torch.float32),
           "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64)}

#: (vector name, codec, params, signed, with buffers)
CASES: list[tuple[str, str, dict[str, Any], bool, bool]] = [
    ("identity", "identity", {}, False, False),
    ("bf16", "bf16", {}, False, False),
    ("fp16", "fp16", {}, False, False),
    ("sign", "sign", {"block": 0, "scale_dtype": "f32", "reduce": "mean"}, False, False),
    ("sign_block4_f16", "sign", {"block": 4, "scale_dtype": "f16", "reduce": "vote"}, False, False),
    ("dct_topk", "dct_topk", {"k": 2, "chunk": 2, "values": "f16", "reduce": "selector-mean"}, False, False),
    ("dct_topk_int8", "dct_topk", {"k": 2, "chunk": 2, "values": "int8", "reduce": "selector-mean"}, False, False),
    ("sparse_topk", "sparse_topk", {"k": 2, "chunk": 4, "bits": 2, "range_sigmas": 6.0, "reduce": "mean"}, False,
     False),
    ("identity_buffers", "identity", {}, False, True),
    ("sign_signed", "sign", {"block": 0, "scale_dtype": "f32", "reduce": "mean"}, True, False),
]

#: a fixed configuration for the config hash vector: floats that JSON writers format differently (1.0, 0.0005,
#: 1e-30), a non-ASCII string and keys whose order differs from their sorted order
CONFIG: dict[str, Any] = {
    "run_id": "vectors", "workers": 4, "rounds": 10, "seed": 0,
    "task": {"name": "gpt", "params": {"size": "tiny", "batch_size": 8, "note": "données — 数据", "eps": 1e-30}},
    "recipe": {"name": "sign", "H": 12, "payload_scale": "inverse_inner_lr", "feedback_decay": 1.0, "overlap": False,
               "codec": {"name": "sign", "params": {"block": 0, "scale_dtype": "f32", "reduce": "mean"}},
               "outer": {"name": "sign_momentum", "lr": 1.0, "lr_follows_inner": True, "clip_norm": None,
                         "params": {"betas": [0.95, 0.98], "weight_decay": 0.1}},
               "inner": {"optimizer": "adamw", "lr": 0.0005, "betas": [0.9, 0.95], "weight_decay": 0.1,
                         "grad_clip": 1.0, "warmup_steps": None, "min_lr_ratio": 0.1, "total_steps": None}},
}


def test_key() -> NodeKey:
    return NodeKey(Ed25519PrivateKey.from_private_bytes(TEST_KEY_SEED))


def _hex(t: torch.Tensor) -> str:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex()


def _check_dct_inputs() -> None:
    """No two DCT coefficient magnitudes tie within a 2×2 block in exact arithmetic (top-k picks are then the same
    in every implementation); fails loudly if someone edits the inputs."""
    w = [[Fraction(int(v * 16), 16) for v in row] for row in weight().tolist()]
    for r in range(0, 4, 2):
        for c in range(0, 6, 2):
            a, b, cc, d = w[r][c], w[r][c + 1], w[r + 1][c], w[r + 1][c + 1]
            mags = sorted(abs(x) for x in (a + b + cc + d, a - b + cc - d, a + b - cc - d, a - b - cc + d))
            assert len(set(mags)) == 4 and mags[0] != mags[1], f"tied DCT magnitudes in block ({r}, {c})"


def frame_of(codec_name: str, params: dict[str, Any], signed: bool, buffers: bool) -> tuple[bytes, dict[str, Any]]:
    """(the frame, its manifest entry without name/file)."""
    codec = make_codec(codec_name, params)
    tensors = {name: make() for name, make in MODEL.items()}
    spec = wire.model_spec(list(tensors.items()))
    encoded = {name: codec.encode(codec.fit(t)) for name, t in tensors.items()}
    extra_spec = [wire.ExtraSpec(n, tuple(b.shape), b.dtype) for n, b in BUFFERS.items()] if buffers else []
    frame = wire.pack(RUN, ROUND, SENDER, codec, spec, encoded, extra_spec, dict(BUFFERS) if buffers else None,
                      key=test_key() if signed else None)
    entry = {
        "codec": codec.name, "codec_v": codec.version, "params": codec.params(), "signed": signed,
        "size": len(frame), "sha256": hashlib.sha256(frame).hexdigest(),
        "buffers": {name: {key: _hex(buf) for key, buf in enc.items()} for name, enc in encoded.items()},
        "decoded_f32le": {name: _hex(codec.decode(encoded[name], tuple(t.shape))) for name, t in tensors.items()},
    }
    if buffers:
        entry["extra"] = [{"name": n, "dtype": wire.CODE_OF[b.dtype], "shape": list(b.shape), "data": _hex(b)}
                          for n, b in BUFFERS.items()]
    return frame, entry


def build() -> dict[str, bytes]:
    """Every file of tests/vectors/ (besides the code): name → exact bytes."""
    _check_dct_inputs()
    key = test_key()
    files: dict[str, bytes] = {}
    vectors = []
    for name, codec_name, params, signed, buffers in CASES:
        frame, entry = frame_of(codec_name, params, signed, buffers)
        files[f"{name}.frame"] = frame
        vectors.append({"name": name, "file": f"{name}.frame", **entry})
    manifest = {
        "format": "lowband-wire-vectors", "version": 1,
        "about": "inputs -> exact lowband frames, per codec; the format is docs/wire.md",
        "run": RUN, "round": ROUND, "sender": SENDER,
        "model": [{"name": n, "shape": list(make().shape), "values": make().reshape(-1).tolist(),
                   "values_f32le": _hex(make())} for n, make in MODEL.items()],
        "signing_key": {
            "about": "RFC 8032 section 7.1 TEST 1 ed25519 key: PUBLIC TEST MATERIAL, never a node's identity",
            "seed": TEST_KEY_SEED.hex(), "public": key.public.hex()},
        "vectors": vectors,
    }
    files["manifest.json"] = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()
    config = {"about": "the config hash: sha256 of RFC 8785 canonical JSON of the configuration less workers, rounds "
                       "and run_id, plus task_fingerprint; first 16 hex characters (docs/wire.md)",
              "config": CONFIG, "task_fingerprint": TASK_FINGERPRINT,
              "canonical": canonical_config(CONFIG, TASK_FINGERPRINT).decode(),
              "config_hash": config_hash_of(CONFIG, TASK_FINGERPRINT)}
    files["config_hash.json"] = (json.dumps(config, indent=1, ensure_ascii=False) + "\n").encode()
    return files


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: vector_cases.py --write   (rewrites tests/vectors/*.frame and *.json)")
    for file, data in build().items():
        (HERE / file).write_bytes(data)
        print(f"wrote {file} ({len(data)} bytes)")
