"""A user's own DDP training loop through the Python API, run by torchrun (test_cluster_multiprocess_node.py): every
rank wraps the run's model in DistributedDataParallel and calls ``lowband.join`` and ``session.step()``; rank 0 joins
the run, the others follow it. Writes WORKDIR/rankR.jsonl: one line per round, the report and the rank's local model."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lowband
from node.runfile import load_run_file
from node.tasks import load_task
from node.tasks.base import build_seeded
from node.train.reference import tensors_fingerprint


def main() -> int:
    import faulthandler

    faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where, in the log, and ends the process
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_run_file(args.run).run
    task = load_task(cfg.task.name, **cfg.task.params)
    model = build_seeded(task, 100 + rank)  # any weights: join gives every rank the run's
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with lowband.join(ddp, optimizer, run=args.run, coordinator=args.coordinator, workdir=args.workdir,
                      name=args.name) as session:
        shard, shards = session.shard
        batches = task.batches(shard * world + rank, shards * world, cfg.seed)
        while not session.done:
            loss = task.loss(ddp, next(batches))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report = session.step(loss.detach())
            if report is not None:
                local = tensors_fingerprint([p.detach() for p in model.parameters()])
                with open(Path(args.workdir) / f"rank{rank}.jsonl", "a") as out:
                    out.write(json.dumps({"rank": rank, "round": report.round, "fingerprint": report.fingerprint,
                                          "members": list(report.members), "local": local}) + "\n")
    # Both ranks finish with the run before either tears its side down, and the DDP wrapper (its reducer holds the
    # process group) goes while both still hold the group: a follower freeing it after the leader had left hung
    # in gloo's teardown.
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without running C++ finalizers: what this script checks is written by then (docs/api.md, "Multi-GPU
    # nodes": a follower once hung in c10d/gloo teardown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
