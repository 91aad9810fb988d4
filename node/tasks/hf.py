"""A Hugging Face causal LM as a run's task: ``task = "node.tasks.hf:causal_lm"`` (needs ``pip install lowband[hf]``).

A ``transformers`` GPT-2 (``GPT2LMHeadModel``) built from a small config with random initial weights — nothing is
downloaded — on the built-in byte-level corpus (node/tasks/corpus.py: the standard library's sources; vocabulary 256,
one token per byte, so no tokenizer has to be shipped or agreed on). The run's coordinator builds it to hold θ_ref
and evaluate it; a node driving its own loop through the Python API (``lowband.join``) builds the same model itself:

    GPT2LMHeadModel(node.tasks.hf.gpt2_config(n_layer=2, n_head=2, n_embd=64, block_size=64))

and ``lowband.join`` checks it against this task's (names, shapes, dtypes). ``lowband node`` can train it through
the Task seam as well. Parameters (``[task]``): ``n_layer`` (2), ``n_head`` (2), ``n_embd`` (64), ``block_size`` (64,
the context in bytes), ``batch_size`` (8), ``eval_batches`` (4), ``dropout`` (0.0).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.tasks.base import Batch
from node.tasks.gpt import GPTTask


def gpt2_config(n_layer: int = 2, n_head: int = 2, n_embd: int = 64, block_size: int = 64,
                dropout: float = 0.0) -> Any:
    """The ``transformers.GPT2Config`` of the task with these parameters: byte-level (vocabulary 256)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=256, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
                      use_cache=False)


class CausalLMTask(GPTTask):
    """GPT-2 from ``transformers`` on the stdlib corpus; batches and evaluation are the built-in ``gpt`` task's."""

    name = "hf-gpt2"

    def __init__(self, n_layer: int = 2, n_head: int = 2, n_embd: int = 64, block_size: int = 64,
                 batch_size: int = 8, eval_batches: int = 4, dropout: float = 0.0) -> None:
        super().__init__("tiny", batch_size, eval_batches, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         block_size=block_size)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)

    @property
    def fingerprint(self) -> str:
        payload = {"base": super().fingerprint, "model": "transformers.GPT2LMHeadModel", "dropout": self.dropout}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def build_model(self, seed: int) -> nn.Module:
        from transformers import GPT2LMHeadModel

        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return GPT2LMHeadModel(gpt2_config(c.n_layer, c.n_head, c.n_embd, c.block_size, self.dropout))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        logits = model(input_ids=x).logits  # (B, T, 256)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def causal_lm(**params: Any) -> CausalLMTask:
    """``[run] task = "node.tasks.hf:causal_lm"``; ``[task]`` keys are ``CausalLMTask``'s parameters."""
    return CausalLMTask(**params)
