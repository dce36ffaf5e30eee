"""E2E-QP's resume state: one safetensors file in the work directory (``OUT.partial/``) holding
the trainable tensors, the optimizer's moments and the best step sizes, with the scalars (step,
best-so-far, history, loss scale) as JSON in its header: nothing is unpickled on resume. Written
and read through the shared skeleton (:mod:`eqat_cli.train.runs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eqat_cli.train.runs import read_tensor_state

STATE_FILE = "e2e_state.safetensors"
STATE_KEY = "eqat_e2e_state"
STATE_FORMAT = "eqat-e2e-state"


def read_state(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON header and tensors of a resume file; a damaged file is a one-line error."""
    return read_tensor_state(path, STATE_KEY, STATE_FORMAT, "E2E-QP resume state")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{name}"] = v
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, scalars


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            pid, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in scalars.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


@dataclass
class _TrainState:
    """What a resume file restores besides tensors: the step, the best held-out loss and its step
    sizes, and the loss history."""

    step: int = 0
    best_val: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: dict = field(default_factory=lambda: {"train_loss": [], "val_loss": []})
