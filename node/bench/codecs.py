"""``lowband bench codecs``: encode + decode throughput and exact wire size of every codec.

The tensors are the built-in GPT's parameters at the chosen size (``medium`` ≈ 25M parameters), or one flat tensor
of ``numel`` elements, filled with Gaussian noise (top-k and sign costs do not depend on the values' meaning). Bits
per parameter count the whole frame, envelope included. Times are the median over the repetitions (the minimum is in
results.json too): on a shared machine the median is the steadier figure. Each is given as wall time and as this
process's CPU time (``time.process_time``): with one torch thread, the CPU time is what the work costs, whatever the
other tenants of a busy machine take from the wall clock.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from node import wire
from node.compress import make_codec
from node.fsutil import write_atomic
from node.tasks.gpt import GPT_SIZES, GPT
from node.progress import progress_iter

log = logging.getLogger(__name__)

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("identity", {}),
    ("bf16", {}),
    ("sign", {"block": 0}),
    ("sign", {"block": 4096}),
    ("dct_topk", {"k": 32, "chunk": 64, "values": "f16"}),
    ("dct_topk", {"k": 32, "chunk": 64, "values": "int8"}),
    ("dct_topk", {"k": 32, "chunk": 64, "values": "sign"}),
]


def run_codec_bench(size: str = "medium", repeats: int = 3, out: Path | None = None, device: str = "cpu",
                    numel: int | None = None, codecs: list[str] | None = None,
                    reduce_members: int = 0) -> list[dict[str, Any]]:
    """Encode + decode every tensor of the ``size`` GPT (or of one flat ``numel``-element tensor) with each codec of
    CONFIGS (those named in ``codecs``, if given), ``repeats`` times; with ``reduce_members`` > 0 also the codec's
    reduce of that many payloads per tensor (what a coordinator does per round). Prints a table, writes results.json
    to ``out``. Times in seconds (median over repetitions; ``*_min_s`` the fastest). Raises ValueError when
    ``codecs`` names none of CONFIGS."""
    gen = torch.Generator().manual_seed(0)
    if numel is None:
        model = GPT(GPT_SIZES[size])
        named = [(n, torch.randn(p.shape, generator=gen).to(device)) for n, p in model.named_parameters()]
        subject = f"gpt {size}"
    else:
        named = [("flat", torch.randn(numel, generator=gen).to(device))]
        subject = "one flat tensor"
    configs = [c for c in CONFIGS if codecs is None or c[0] in codecs]
    if not configs:
        raise ValueError(f"no codec of {sorted({c[0] for c in CONFIGS})} selected by {codecs}")
    spec = wire.model_spec(named)
    params = sum(t.numel() for _, t in named)
    rows = []
    for name, cparams in progress_iter(configs, "bench codecs", unit="codecs"):
        codec = make_codec(name, cparams)
        enc_s: list[float] = []
        dec_s: list[float] = []
        enc_cpu: list[float] = []
        dec_cpu: list[float] = []
        red_s: list[float] = []
        red_cpu: list[float] = []
        frame = b""
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            encoded = {n: codec.encode(t) for n, t in named}
            t1, c1 = time.perf_counter(), time.process_time()
            for n, t in named:
                codec.decode(encoded[n], tuple(t.shape))
            t2, c2 = time.perf_counter(), time.process_time()
            enc_s.append(t1 - t0)
            dec_s.append(t2 - t1)
            enc_cpu.append(c1 - c0)
            dec_cpu.append(c2 - c1)
            if reduce_members:
                for n, t in named:
                    codec.reduce([encoded[n]] * reduce_members, tuple(t.shape))
                red_s.append(time.perf_counter() - t2)
                red_cpu.append(time.process_time() - c2)
            frame = wire.pack("bench", 0, "w0", codec, spec, encoded)
        enc, dec = statistics.median(enc_s), statistics.median(dec_s)
        formula = sum(codec.nbytes(t.shape) for t in spec)
        row = {"codec": codec.describe(), "params": params, "frame_bytes": len(frame), "formula_bytes": formula,
               "bits_per_param": len(frame) * 8 / params, "envelope_overhead": len(frame) / formula,
               "encode_s": enc, "decode_s": dec, "encode_min_s": min(enc_s), "decode_min_s": min(dec_s),
               "encode_cpu_s": statistics.median(enc_cpu), "decode_cpu_s": statistics.median(dec_cpu),
               "reduce_members": reduce_members,
               "reduce_s": statistics.median(red_s) if red_s else None,
               "reduce_cpu_s": statistics.median(red_cpu) if red_cpu else None,
               "encode_Mparam_per_s": params / enc / 1e6, "decode_Mparam_per_s": params / dec / 1e6}
        rows.append(row)
        log.info("%s: %.3f bits/param, encode %.3f s, decode %.3f s", row["codec"], row["bits_per_param"], enc, dec)
    lines = [f"{subject}, {params:,} parameters; device {device}; {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"median of {repeats}", "",
             "| codec | frame bytes | formula bytes | frame/formula | bits/param | encode s | decode s | encode CPU s "
             "| decode CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['frame_bytes']:,} | {r['formula_bytes']:,} | {r['envelope_overhead']:.4f} | "
                     f"{r['bits_per_param']:.3f} | {r['encode_s']:.3f} | {r['decode_s']:.3f} | "
                     f"{r['encode_cpu_s']:.3f} | {r['decode_cpu_s']:.3f} |")
    if reduce_members:
        lines += ["", f"| codec | reduce of {reduce_members} payloads s | reduce CPU s |", "|---|---|---|"]
        lines += [f"| {r['codec']} | {r['reduce_s']:.3f} | {r['reduce_cpu_s']:.3f} |" for r in rows]
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "results.json", json.dumps(rows, indent=2), durable=False)
    return rows
