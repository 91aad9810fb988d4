"""The built-in task "gpt": a small nanoGPT-style byte-level transformer on the stdlib corpus.

Byte-level (vocabulary 256) so that no tokenizer has to be shipped or agreed upon between nodes; the
architecture follows nanoGPT so that results are comparable with the many runs people know.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from node.tasks.base import Batch, Task
from node.tasks.corpus import Corpus, load_stdlib_corpus, shard_bounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the transformer; validated on construction so that a bad override fails before training."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length in bytes
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GPTConfig.{f.name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"GPTConfig.{f.name} must be positive, got {value}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


GPT_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=96, block_size=64),
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=144, block_size=128),
    "medium": GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm residual, (B, T, C)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer returning logits; the loss lives in the task, not the model."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one tensor, counted once by parameters()
        self.apply(self._init_weights)
        # Residual projections add into the stream once per layer and sublayer; scale them so the
        # residual variance does not grow with depth (GPT-2 paper, as in nanoGPT).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def _seed_from(*parts: int) -> int:
    """A 63-bit seed from several ints; hashing keeps nearby (seed, worker) pairs uncorrelated."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _windows(stream: torch.Tensor, starts: torch.Tensor, block_size: int) -> Batch:
    """Gather (x, y) int64 windows; y is x shifted left by one byte."""
    idx = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    w = stream[idx].long()  # (B, T+1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # 2 x (B, T)


class GPTTask(Task):
    """nanoGPT-style byte-level language modelling on the stdlib corpus."""

    name = "gpt"

    def __init__(self, size: str = "tiny", batch_size: int = 8, eval_batches: int = 8,
                 corpus: Corpus | None = None, **overrides: Any) -> None:
        if size not in GPT_SIZES:
            raise ValueError(f"size must be one of {sorted(GPT_SIZES)}, got {size!r}")
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; expected some of {sorted(known)}")
        for field, value in (("batch_size", batch_size), ("eval_batches", eval_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        self.size = size
        self.config = dataclasses.replace(GPT_SIZES[size], **overrides)
        self.batch_size = batch_size
        self.eval_batches = eval_batches
        self._corpus = corpus

    @property
    def corpus(self) -> Corpus:
        """Loaded on first use so that constructing a task (e.g. to validate a CLI) reads no data."""
        if self._corpus is None:
            self._corpus = load_stdlib_corpus()
        return self._corpus

    @property
    def fingerprint(self) -> str:
        payload = {"corpus": self.corpus.fingerprint, "config": dataclasses.asdict(self.config),
                   "batch_size": self.batch_size}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.config.block_size

    def build_model(self, seed: int) -> nn.Module:
        # fork_rng: module constructors draw from the global RNG; callers' streams must stay untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return GPT(self.config)

    def batch_starts(self, worker: int, num_workers: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless (batch_size,) int64 window offsets into ``corpus.train``; exposed to test sharding."""
        lo, hi = shard_bounds(len(self.corpus.train), worker, num_workers)
        T = self.config.block_size
        if hi - lo < T + 1:
            raise ValueError(
                f"worker {worker}'s shard of the train stream has {hi - lo} bytes, fewer than block_size+1 "
                f"= {T + 1}; use fewer workers (num_workers={num_workers}) or a smaller block_size")
        gen = torch.Generator().manual_seed(_seed_from(seed, worker, num_workers))
        while True:
            # The last window starts at hi-T-1 so that its target byte hi-1 stays inside the shard.
            yield torch.randint(lo, hi - T, (self.batch_size,), generator=gen)

    def batches(self, worker: int, num_workers: int, seed: int) -> Iterator[Batch]:
        return self.batches_from(worker, num_workers, seed, 0)

    def batches_from(self, worker: int, num_workers: int, seed: int, step: int) -> Iterator[Batch]:
        """As ``batches``, from its ``step``-th batch: the skipped offsets are drawn (the generator has to advance)
        but no window is gathered."""
        starts = self.batch_starts(worker, num_workers, seed)
        for _ in range(step):
            next(starts)
        return self._windows_of(starts)

    def _windows_of(self, starts: Iterator[torch.Tensor]) -> Iterator[Batch]:
        stream = self.corpus.train
        for s in starts:
            yield _windows(stream, s, self.config.block_size)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)  # (B, T, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def eval_starts(self) -> torch.Tensor:
        """(eval_batches, batch_size) evenly spaced offsets into ``corpus.val``: the same set every call."""
        T = self.config.block_size
        n = self.eval_batches * self.batch_size
        last = len(self.corpus.val) - T - 1
        if last < 0:
            raise ValueError(f"validation stream has {len(self.corpus.val)} bytes, fewer than block_size+1 "
                             f"= {T + 1}; raise val_percent or lower block_size")
        starts = torch.arange(n, dtype=torch.int64) * last // max(n - 1, 1)  # (n,)
        return starts.view(self.eval_batches, self.batch_size)

    def evaluate(self, model: nn.Module) -> float:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for starts in self.eval_starts():
                    x, y = _windows(self.corpus.val, starts, self.config.block_size)
                    total += float(self.loss(model, (x.to(device), y.to(device))))
        finally:
            model.train(was_training)
        return total / self.eval_batches


def gpt_task(**kwargs: Any) -> GPTTask:
    """Factory used by ``load_task("gpt")``; kwargs are GPTTask's."""
    return GPTTask(**kwargs)


def num_params(model: nn.Module) -> int:
    """Unique parameters (the tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())
