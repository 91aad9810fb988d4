"""``inner.optimizer = "muon"``: Muon for the hidden weight matrices, AdamW for everything else, as the Muon papers
train (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024; MuLoCo, Thérien et al.,
arXiv 2505.23725, uses it as DiLoCo's inner optimizer and finds its pseudo-gradients compress better).

Which tensors Muon takes: 2-D parameters that are neither an embedding nor the output head — by name, a parameter
whose name contains one of ``NOT_HIDDEN`` is left to AdamW (the built-in GPT's ``wte``, ``wpe`` and its tied head;
a user model names its embeddings and head this way, or they are treated as hidden). 1-D parameters (norms, biases)
go to AdamW with no weight decay; other ≥ 2-D ones with it.

Muon is ``torch.optim.Muon`` with ``adjust_lr_fn="match_rms_adamw"``: its update is scaled to AdamW's RMS, so one
inner lr and its schedule drive both groups (the inner loop sets ``lr`` on every parameter group each step).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

NOT_HIDDEN = ("emb", "wte", "wpe", "head")


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and not any(part in name for part in NOT_HIDDEN)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over two: ``torch.optim.Muon`` on the hidden matrices, ``torch.optim.AdamW`` on the rest.

    ``named``: (name, tensor) of every tensor to optimize (the fp32 masters, under their parameters' names).
    ``param_groups`` is the concatenation of both optimizers' groups (Muon's first), so a schedule that sets
    ``group["lr"]`` reaches both; ``state_dict`` holds both."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], lr: float, betas: tuple[float, float],
                 weight_decay: float) -> None:
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw") \
            if hidden else None
        groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}]
        self.adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
        self.parts = [o for o in (self.muon, self.adamw) if o is not None]
        # torch.optim.Optimizer's bookkeeping (hooks, defaults) without a second copy of the parameters
        super().__init__([p for _, p in named], {"lr": lr})
        self.param_groups = [g for o in self.parts for g in o.param_groups]

    @property  # type: ignore[override]
    def state(self) -> dict[torch.Tensor, Any]:  # what the inner loop scans for non-finite moments
        merged: dict[torch.Tensor, Any] = {}
        for o in self.parts:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns an empty one
        pass

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def _counts(self) -> list[int]:
        """Parameters each part holds, in ``param_groups`` order."""
        return [sum(len(g["params"]) for g in o.param_groups) for o in self.parts]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """One torch-format state dict (``state`` indexed over the concatenated groups, Muon's first), so what saves
        and checks any optimizer's state (node/train/state_file.py) saves this one."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for o, count in zip(self.parts, self._counts()):
            sd = o.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += count
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        groups = list(state_dict["param_groups"])
        offset = 0
        for o, count in zip(self.parts, self._counts()):
            mine = groups[:len(o.param_groups)]
            groups = groups[len(o.param_groups):]
            o.load_state_dict({
                "state": {i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += count
        self.param_groups = [g for o in self.parts for g in o.param_groups]
