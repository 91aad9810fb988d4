"""A ``transformers.Trainer`` script that joins a lowband run with one added line (docs/api.md).

The model is a GPT-2 built from a small config (random weights: nothing is downloaded), the dataset byte windows of
the standard library's sources; everything else is an ordinary Trainer script. The one lowband line is
``trainer.add_callback(lowband.LowbandCallback(...))``: the Trainer's optimizer steps become the node's inner steps,
every H of them the node exchanges and takes the outer step, and the Trainer stops when the run's last round is in.

    lowband coordinator --listen 127.0.0.1:7070 --state-dir /tmp/hf-coordinator --run examples/hf_gpt2.toml
    python examples/hf_trainer.py --coordinator 127.0.0.1:7070 --run examples/hf_gpt2.toml --workdir /tmp/tr0
    python examples/hf_trainer.py --coordinator 127.0.0.1:7070 --run examples/hf_gpt2.toml --workdir /tmp/tr1
"""
from __future__ import annotations

import argparse
import logging
import hashlib
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowband  # noqa: E402
from hf_common import BLOCK, build_model, train_bytes  # noqa: E402


class ByteWindows(Dataset):
    """Item i: a BLOCK-byte window of ``data`` at a position drawn from (seed, i) — a deterministic, seekable dataset
    of ``size`` items."""

    def __init__(self, data: torch.Tensor, seed: int, size: int = 1_000_000) -> None:
        self.data, self.seed, self.size = data, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        digest = hashlib.sha256(f"{self.seed}:{i}".encode()).digest()
        start = int.from_bytes(digest[:8], "little") % (len(self.data) - BLOCK)
        ids = self.data[start:start + BLOCK].long()
        return {"input_ids": ids, "labels": ids}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--name", default="")
    ap.add_argument("--data-seed", type=int, default=0, help="which windows this node reads (differ per node)")
    ap.add_argument("--max-steps", type=int, default=100_000, help="the Trainer's bound; the run ends it first")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # lowband's join and round lines

    model = build_model()
    training = TrainingArguments(output_dir=str(Path(args.workdir) / "trainer"), max_steps=args.max_steps,
                                 per_device_train_batch_size=8, learning_rate=1e-3, warmup_steps=16,
                                 lr_scheduler_type="constant_with_warmup", weight_decay=0.1, max_grad_norm=1.0,
                                 logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                                 dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=args.data_seed)
    trainer = Trainer(model=model, args=training, train_dataset=ByteWindows(train_bytes(), args.data_seed))
    trainer.add_callback(lowband.LowbandCallback(run=args.run, coordinator=args.coordinator, workdir=args.workdir,
                                                 name=args.name))  # the one added line
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
