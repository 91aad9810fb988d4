"""Per-round CPU work of one node outside its inner steps (25.5M-parameter model, sign, 4 workers), on one thread:
prepare (Δ, error feedback, encode), apply (decode + reduce + outer step), the checkpoint snapshot and its
serialisation. Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/round_cpu.py"""
import time, io, torch
from node.recipes import make_run_config
from node.config import TaskConfig
from node.tasks import load_task
from node.train.worker import Worker
from node.transport.messages import RoundResult, RoundStatus
torch.set_num_threads(1)
cfg = make_run_config("sign", {"H": 1}, task=TaskConfig("gpt", {"size": "medium", "batch_size": 1, "block_size": 128}))
task = load_task("gpt", size="medium", batch_size=1, block_size=128)
ws = [Worker(f"n{i}", cfg, task, shard=i, num_shards=4) for i in range(4)]
def t(label, f):
    s = time.perf_counter(); out = f(); print(f"{label}: {time.perf_counter()-s:.2f}s"); return out
for w in ws[:4]:
    w.train()
frames = {w.name: t("prepare", lambda w=w: w.prepare(0)) for w in ws}
t("fingerprint", ws[0].fingerprint)
res = RoundResult(0, RoundStatus.COMMITTED, dict(sorted(frames.items())))
t("apply", lambda: ws[0].apply(res))
t("state_dict", lambda: ws[0].state_dict())
from node.daemon import _detached
sd = t("detached", lambda: _detached(ws[0].state_dict()))
def save():
    b = io.BytesIO(); torch.save(sd, b); return b
t("torch.save", save)
t("train H=1", ws[1].train)
