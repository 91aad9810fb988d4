"""Your own training loop, a Hugging Face causal LM, one lowband node (docs/api.md).

A transformers GPT-2 built from a small config (random weights: nothing is downloaded), bytes as tokens, AdamW with
a warmup schedule, gradient clipping — an ordinary PyTorch loop, plus three lines of lowband: ``lowband.join`` before
it, ``session.step()`` after each optimizer step, ``close`` (the ``with`` block) after it. Every H steps the node
exchanges a 1-bit compressed update with the other nodes and takes the outer step.

    lowband coordinator --listen 127.0.0.1:7070 --state-dir /tmp/hf-coordinator --run examples/hf_gpt2.toml
    python examples/hf_gpt2.py --coordinator 127.0.0.1:7070 --run examples/hf_gpt2.toml --workdir /tmp/hf-node0
    python examples/hf_gpt2.py --coordinator 127.0.0.1:7070 --run examples/hf_gpt2.toml --workdir /tmp/hf-node1

Kill a node (even with kill -9) and start the same command again: it resumes from its workdir with its optimizer's
moments and its schedule. Prints one JSON line when it joined and one per round.
"""
from __future__ import annotations

import argparse
import logging
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowband  # noqa: E402
from hf_common import BLOCK, build_model, optimizer_digest, shard_of, train_bytes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coordinator", required=True, help="HOST:PORT of `lowband coordinator`")
    ap.add_argument("--run", required=True, help="the run file (examples/hf_gpt2.toml)")
    ap.add_argument("--workdir", required=True, help="this node's directory (identity, checkpoint, round log)")
    ap.add_argument("--name", default="", help="node name (default HOST-WORKDIRNAME)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=16, help="inner steps of linear warmup")
    ap.add_argument("--max-rounds", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # lowband's join and round lines

    model = build_model().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    session = lowband.join(model, optimizer, scheduler=scheduler, run=args.run, coordinator=args.coordinator,
                           workdir=args.workdir, name=args.name, max_rounds=args.max_rounds)
    with session:
        print(json.dumps({"event": "joined", "resumed": session.resumed, "round": session.round,
                          "inner_step": session.inner_step, "scheduler_last_epoch": scheduler.last_epoch,
                          "lr": optimizer.param_groups[0]["lr"], "optimizer": optimizer_digest(optimizer, model),
                          "fingerprint": session.fingerprint}), flush=True)
        shard, shards = session.shard
        data = shard_of(train_bytes(), shard, shards)
        gen = torch.Generator().manual_seed(shard * 1_000_003 + session.inner_step)
        while not session.done:
            starts = torch.randint(0, len(data) - BLOCK, (args.batch_size,), generator=gen)
            batch = torch.stack([data[s:s + BLOCK] for s in starts.tolist()]).long().to(args.device)  # (B, T)
            loss = model(input_ids=batch, labels=batch).loss  # next-byte cross-entropy
            loss.backward()
            if session.grads_finite(loss):  # a NaN/inf step is skipped, as GradScaler would
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            report = session.step(loss.detach())
            if report is not None:
                line = dataclasses.asdict(report)
                line["loss"] = report.loss if math.isfinite(report.loss) else None
                print(json.dumps({"event": "round", **line}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
