"""The built-in "gpt" task and task loading: determinism, disjoint shards, sane losses, clear errors."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from node.errors import ConfigError
from node.tasks import GPT_SIZES, GPTTask, Task, load_task
from node.tasks import corpus as C
from node.tasks.corpus import Corpus, shard_bounds
from node.tasks.gpt import GPT, GPTConfig, num_params


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return C.load_stdlib_corpus(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def task(corpus: Corpus) -> GPTTask:
    return GPTTask("tiny", batch_size=8, eval_batches=4, corpus=corpus)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("size,lo,hi", [
    ("tiny", 200_000, 350_000), ("small", 1_000_000, 1_500_000),
    ("medium", 20_000_000, 30_000_000), ("gpt2", 80_000_000, 90_000_000),
])
def test_param_counts(size: str, lo: int, hi: int) -> None:
    with torch.device("meta"):  # no memory or init time, even for gpt2
        model = GPT(GPT_SIZES[size])
    assert lo <= num_params(model) <= hi
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_layer=0, n_head=2, n_embd=8, block_size=4), "n_layer"),
    (dict(n_layer=1, n_head=3, n_embd=8, block_size=4), "n_head"),
    (dict(n_layer=1, n_head=2, n_embd=8, block_size=-4), "block_size"),
    (dict(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=2.0), "vocab_size"),
])
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_task_argument_validation(corpus: Corpus) -> None:
    with pytest.raises(ValueError, match="size"):
        GPTTask("huge", corpus=corpus)
    with pytest.raises(ValueError, match="n_lyer"):
        GPTTask("tiny", corpus=corpus, n_lyer=3)
    with pytest.raises(ValueError, match="batch_size"):
        GPTTask("tiny", batch_size=0, corpus=corpus)
    t = GPTTask("tiny", corpus=corpus, block_size=32, n_layer=1)
    assert t.config.block_size == 32 and t.config.n_embd == GPT_SIZES["tiny"].n_embd
    assert t.tokens_per_batch == 8 * 32


def test_fingerprint_tracks_shape_and_batch(task: GPTTask, corpus: Corpus) -> None:
    assert task.fingerprint == GPTTask("tiny", batch_size=8, corpus=corpus).fingerprint
    assert len(task.fingerprint) == 64
    others = {GPTTask("tiny", batch_size=4, corpus=corpus).fingerprint,
              GPTTask("tiny", block_size=32, corpus=corpus).fingerprint,
              GPTTask("small", corpus=corpus).fingerprint}
    assert task.fingerprint not in others and len(others) == 3


def test_same_seed_same_params_and_global_rng_untouched(task: GPTTask) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = task.build_model(0), task.build_model(0), task.build_model(1)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["wte.weight"], pc["wte.weight"])
    assert torch.equal(pa["h.0.attn.c_attn.bias"], torch.zeros_like(pa["h.0.attn.c_attn.bias"]))
    # residual projections are scaled down by 1/sqrt(2*n_layer) relative to the other weights
    assert pa["h.0.mlp.c_proj.weight"].std() < 0.8 * pa["h.0.mlp.c_fc.weight"].std()


def test_batches_deterministic_shapes_and_shift(task: GPTTask, corpus: Corpus) -> None:
    first = _take(task.batches(0, 2, seed=7), 3)
    again = _take(task.batches(0, 2, seed=7), 3)
    other = _take(task.batches(0, 2, seed=8), 3)
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(first[0][0], other[0][0])
    x, y = first[0]
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = next(task.batch_starts(0, 2, seed=7))
    for row, s in enumerate(starts.tolist()):
        assert torch.equal(x[row], corpus.train[s:s + 64].long())
        assert torch.equal(y[row], corpus.train[s + 1:s + 65].long())


@pytest.mark.parametrize("num_workers", [2, 5])
def test_worker_windows_stay_in_disjoint_shards(task: GPTTask, num_workers: int) -> None:
    T = task.config.block_size
    ranges = []
    for w in range(num_workers):
        starts = torch.cat(_take(task.batch_starts(w, num_workers, seed=3), 50))
        lo, hi = shard_bounds(len(task.corpus.train), w, num_workers)
        assert starts.min() >= lo and starts.max() + T + 1 <= hi  # x and y windows inside the shard
        ranges.append((int(starts.min()), int(starts.max()) + T + 1))
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start
    # different workers draw from independent streams, not the same offsets shifted
    a = torch.cat(_take(task.batch_starts(0, 2, 3), 5))
    b = torch.cat(_take(task.batch_starts(1, 2, 3), 5)) - shard_bounds(len(task.corpus.train), 1, 2)[0]
    assert not torch.equal(a, b)


def test_shard_shorter_than_window_is_rejected() -> None:
    small = Corpus(train=torch.zeros(100, dtype=torch.uint8), val=torch.zeros(100, dtype=torch.uint8),
                   fingerprint="0" * 64, num_files=1)
    t = GPTTask("tiny", corpus=small)
    with pytest.raises(ValueError, match="block_size"):
        next(t.batches(0, 2, seed=0))
    next(GPTTask("tiny", corpus=small, block_size=16).batches(0, 2, seed=0))


def test_untrained_loss_is_uniform(task: GPTTask) -> None:
    model = task.build_model(0)
    loss = task.loss(model, next(task.batches(0, 1, seed=0)))
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(256)) < 0.3


def test_a_few_adamw_steps_reduce_loss(task: GPTTask) -> None:
    model = task.build_model(0)
    batch = next(task.batches(0, 1, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = task.loss(model, batch).item()
    for _ in range(15):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    with torch.no_grad():
        end = task.loss(model, batch).item()
    assert end < start - 1.0


def test_evaluate_deterministic_and_restores_mode(task: GPTTask) -> None:
    model = task.build_model(0)
    model.train()
    first = task.evaluate(model)
    assert model.training
    model.eval()
    assert task.evaluate(model) == first
    assert not model.training
    assert abs(first - math.log(256)) < 0.3
    starts = task.eval_starts()
    assert starts.shape == (4, 8) and torch.equal(starts, task.eval_starts())
    assert int(starts.min()) == 0 and int(starts.max()) == len(task.corpus.val) - 65


def test_load_task_builtin(corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = load_task("gpt", size="tiny", batch_size=2, corpus=corpus)
    assert isinstance(t, GPTTask) and t.name == "gpt" and t.batch_size == 2
    # without an explicit corpus the task loads the shared one lazily, honouring LOWBAND_CACHE
    monkeypatch.setenv("LOWBAND_CACHE", str(tmp_path))
    lazy = load_task("gpt")
    assert lazy.corpus.fingerprint == corpus.fingerprint


@pytest.mark.parametrize("spec,message", [
    ("nonexistent.mod:fn", "module 'nonexistent.mod' not found"),
    ("node.tasks:GPT_SIZES", "is a dict, not a callable"),
    ("node.tasks:no_such_factory", "has no attribute 'no_such_factory'"),
    ("bert", "expected one of"),
    ("node.tasks:", "expected one of"),
])
def test_load_task_errors_are_precise(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):  # `lowband` prints it in one line (exit 2), no traceback
        load_task(spec)


USER_MODULE = '''
import torch
from node.tasks import Task

class Const(Task):
    name = "const"
    def __init__(self, width):
        self.width = width
    fingerprint = "f" * 64
    tokens_per_batch = 1
    def build_model(self, seed):
        return torch.nn.Linear(self.width, 1)
    def batches(self, worker, num_workers, seed):
        while True:
            yield torch.zeros(1, self.width), torch.zeros(1, 1)
    def loss(self, model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean()
    def evaluate(self, model):
        return 0.0

def make(width=3):
    return Const(width)

def not_a_task():
    return 42
'''


def test_user_task_from_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lowband_user_task_mod.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "lowband_user_bad_dep.py").write_text("import lowband_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("lowband_user_task_mod:make", width=5)
    assert isinstance(task, Task) and task.name == "const" and task.width == 5
    assert task.loss(task.build_model(0), next(task.batches(0, 1, 0))).dim() == 0
    with pytest.raises(ValueError, match=r"not_a_task\(\) returned a value of type int, not a Task"):
        load_task("lowband_user_task_mod:not_a_task")
    with pytest.raises(ValueError, match="failed to import.*lowband_missing_dependency_xyz"):
        load_task("lowband_user_bad_dep:make")
