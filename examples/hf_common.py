"""What both Hugging Face examples share: the model (a GPT-2 built from a small config, random weights — nothing is
downloaded), the byte-level "tokenizer" and the data (the standard library's sources, the corpus lowband's built-in
tasks use), and a digest of an optimizer's state for the restart check. Run from the repository root."""
from __future__ import annotations

import hashlib

import torch
from transformers import GPT2Config, GPT2LMHeadModel

BLOCK = 64  # context in bytes: [task] block_size of examples/hf_gpt2.toml


def build_model() -> GPT2LMHeadModel:
    """The run's model: examples/hf_gpt2.toml's [task] says the same, and lowband.join checks that it does."""
    config = GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(config)


def encode(text: str) -> torch.Tensor:
    """The tokenizer: one token per UTF-8 byte (vocabulary 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def train_bytes() -> torch.Tensor:
    """The training stream, (N,) uint8: lowband's built-in corpus (built once from the standard library, cached)."""
    from node.tasks.corpus import load_stdlib_corpus

    return load_stdlib_corpus().train


def shard_of(data: torch.Tensor, shard: int, shards: int) -> torch.Tensor:
    """This node's contiguous part of ``data`` (nodes train disjoint data)."""
    size = len(data) // shards
    return data[shard * size:(shard + 1) * size]


def optimizer_digest(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> str:
    """sha256 over the optimizer's state tensors, by (parameter name, key) in sorted order — the same digest a test
    computes from the node's checkpoint (``inner/<name>/<key>`` tensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    items = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    items.append((f"{names[id(p)]}/{key}", value.detach().float().cpu().contiguous()))
    h = hashlib.sha256()
    for key, value in sorted(items, key=lambda kv: kv[0]):
        h.update(key.encode() + b"\0" + value.reshape(-1).numpy().tobytes())
    return h.hexdigest()[:16]
