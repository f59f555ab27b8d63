"""Training checkpoints as safetensors and JSON (nothing is pickled), written atomically.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>/``:

* ``trainable.safetensors``: the tensors the trainer hands over (parameters, retain bases, method state);
* ``adapter/``: :func:`nsru.save_adapter`'s files, when the model has adapters;
* ``optimizer.safetensors``: the optimizer's state tensors (AdamW's moments);
* ``rng.safetensors``: the torch CPU and CUDA generator states;
* ``trainer_state.json``: the trainer's own state (step, data positions, schedule, history...),
  the optimizer's scalars and param groups, and the Python and NumPy generator states.

The folder is written under a temporary name and renamed (:func:`nsru.atomic.atomic_write`), then
``<output_dir>/latest`` is pointed at it and all but the newest ``keep`` checkpoints are removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nsru.adapt import save_adapter
from nsru.atomic import atomic_write

CHECKPOINT_FORMAT = "nsru-checkpoint"
# 2: trainer_state.json holds the LR scheduler's state (and no longer an unused "extra" entry).
CHECKPOINT_VERSION = 2
LATEST = "latest"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
ADAPTER_DIR = "adapter"


# --------------------------------------------------------------------------------------------
# optimizer and RNG states as tensors + JSON


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state dict as ``(tensors, json_meta)``: state tensors by ``state.<i>.<key>``,
    the rest (scalars, param groups) as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Inverse of :func:`optimizer_to_files`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The torch (CPU, CUDA) generator states as tensors; Python's and NumPy's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        st = np.random.get_state()
        meta["numpy"] = [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]
    except ImportError:  # pragma: no cover
        pass
    return tensors, meta


def set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Inverse of :func:`rng_state` (CUDA states only where the device count matches)."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in meta:
        import numpy as np

        st = meta["numpy"]
        np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), st[2], st[3], st[4]))


# --------------------------------------------------------------------------------------------
# checkpoint folders


def _step_folders(output_dir: Path, complete: bool) -> list[Path]:
    """``checkpoint-<step>`` folders sorted by step (only those with a state file if ``complete``)."""
    found = (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (not complete or (p / STATE_FILE).is_file()))
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (``None`` when there is none)."""
    out = Path(output_dir)
    pointer = out / LATEST
    if pointer.is_file():
        path = out / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
    found = _step_folders(out, complete=True)
    return found[-1] if found else None


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    trainable: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: Mapping,
    adapter_model: nn.Module | None = None,
    keep: int = 2,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (replacing one of the same step), point
    ``latest`` at it and remove all but the newest ``keep`` checkpoints. ``state``: the caller's
    JSON-able state, stored in ``trainer_state.json`` beside the format, step, optimizer scalars
    and RNG states; ``adapter_model``: a model whose NSRU adapters go to ``adapter/``.
    Call it on one process only."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"

    def write(tmp: Path) -> None:
        save_file(dict(trainable), str(tmp / TRAINABLE_FILE))
        if adapter_model is not None:
            save_adapter(adapter_model, tmp / ADAPTER_DIR)
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / RNG_FILE))
        doc = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, **state,
               "optimizer": opt_meta, "rng": rng_meta}
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1, default=str) + "\n")

    atomic_write(final, write, directory=True)
    atomic_write(out / LATEST, lambda p: p.write_text(final.name + "\n"))
    for old in _step_folders(out, complete=False)[:-max(1, int(keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A checkpoint read from disk; nothing is restored until asked."""

    path: Path
    state: dict  # trainer_state.json
    trainable: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    rng_tensors: dict[str, torch.Tensor]

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer_from_files(optimizer, self.optimizer_tensors, self.state["optimizer"])

    def restore_rng(self) -> None:
        """Put back the Python, NumPy and torch generator states saved with the checkpoint."""
        set_rng_state(self.rng_tensors, self.state["rng"])


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check the checkpoint folder at ``path`` (raises when it is not one)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_file}: not an NSRU checkpoint")
    return Checkpoint(
        path=path,
        state=state,
        trainable=load_file(str(path / TRAINABLE_FILE)),
        optimizer_tensors=load_file(str(path / OPTIMIZER_FILE)),
        rng_tensors=load_file(str(path / RNG_FILE)),
    )
