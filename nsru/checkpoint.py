"""Training checkpoints as safetensors and JSON (nothing is pickled), written atomically.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>/``:

* ``trainable.safetensors``: the tensors the trainer hands over (parameters, retain bases, method state);
* ``adapter/``: :func:`nsru.save_adapter`'s files, when the model has adapters;
* ``optimizer.safetensors``: the optimizer's state tensors (AdamW's moments);
* ``rng.safetensors``: the torch CPU and CUDA generator states;
* ``trainer_state.json``: the trainer's own state (step, data positions, schedule, history...),
  the optimizer's scalars and param groups, the Python and NumPy generator states, and the size
  and SHA-256 of every other file of the folder.

The folder is written under a temporary name and renamed (:func:`nsru.atomic.atomic_write`), then
``<output_dir>/latest`` is pointed at it and all but the newest ``keep`` checkpoints are removed.

Reading checks every file against its recorded size and hash, so a truncated or corrupted
checkpoint is named (:class:`CheckpointError`) instead of loaded; :func:`find_resumable` then falls
back to the newest older one that reads. :func:`check_output_dir` tells before a run starts whether
its checkpoints can be written at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nsru.adapt import save_adapter
from nsru.atomic import atomic_write

CHECKPOINT_FORMAT = "nsru-checkpoint"
# 2: trainer_state.json holds the LR scheduler's state (and no longer an unused "extra" entry).
# 3: trainer_state.json holds "files", the size and SHA-256 of every other file (versions 1-2 read without).
# 4: the scheduler state's lr_lambdas hold the schedule itself (kind, warm-up, total, and where a resume
#    with other steps re-anchored its decay); older ones get it from their config (nsru.schedule).
CHECKPOINT_VERSION = 4
LATEST = "latest"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
ADAPTER_DIR = "adapter"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: missing, truncated or corrupted files."""


class OutputDirError(OSError):
    """An output folder where the run could not write its checkpoints."""


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


def _step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _step_folders(output_dir: Path, complete: bool) -> list[Path]:
    """``checkpoint-<step>`` folders sorted by step (only those with a state file if ``complete``)."""
    found = (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (not complete or (p / STATE_FILE).is_file()))
    return sorted(found, key=_step)


def _candidates(output_dir: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one ``latest`` names, then older ones by step.
    (Folders newer than ``latest`` belong to an earlier run in the same folder, or to a write that
    was killed between the rename and the pointer; neither is this run's state.)"""
    folders = _step_folders(output_dir, complete=False)
    pointer = output_dir / LATEST
    if pointer.is_file():
        named = output_dir / pointer.read_text().strip()
        if named in folders:
            return [named] + [p for p in reversed(folders) if _step(p) < _step(named)]
    return list(reversed(folders))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (``None`` when there is none); its files
    are not read (see :func:`find_resumable`)."""
    found = [p for p in _candidates(Path(output_dir)) if (p / STATE_FILE).is_file()]
    return found[0] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


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
    JSON-able state, stored in ``trainer_state.json`` beside the format, step, optimizer scalars,
    RNG states and the files' hashes; ``adapter_model``: a model whose NSRU adapters go to
    ``adapter/``. Call it on one process only. A failed write (a full disk) raises
    :class:`OutputDirError` and leaves the earlier checkpoints as they were."""
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
               "optimizer": opt_meta, "rng": rng_meta, "files": _manifest(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1, default=str) + "\n")

    try:
        atomic_write(final, write, directory=True)
        atomic_write(out / LATEST, lambda p: p.write_text(final.name + "\n"))
    except OSError as err:
        kept = latest_checkpoint(out)
        raise OutputDirError(
            f"could not write checkpoint {final} ({type(err).__name__}: {err}); the earlier checkpoints are "
            f"untouched (latest: {kept or 'none'})") from err
    for old in _step_folders(out, complete=False)[:-max(1, int(keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the half-written ``.checkpoint-*.tmp`` folders a killed run leaves behind (call it
    when no other process writes into ``output_dir``); returns what was removed."""
    stale = [p for p in Path(output_dir).glob(".checkpoint-*.tmp")] + list(Path(output_dir).glob(f".{LATEST}.*.tmp"))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


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


def _verify_files(path: Path, files: Mapping[str, Mapping]) -> None:
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the checkpoint lists it)")
        size = file.stat().st_size
        if size != meta["bytes"]:
            what = "truncated" if size < meta["bytes"] else "longer than written"
            raise CheckpointError(f"{file}: {what} ({size} bytes, {meta['bytes']} were written)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: corrupted (its SHA-256 differs from the one written with it)")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:  # never falls back to torch.load
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check the checkpoint folder at ``path``: raises :class:`CheckpointError` naming the
    file when it is not one, or when a file is missing, truncated or corrupted."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_file}: truncated or corrupted ({err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{state_file}: not an NSRU checkpoint")
    missing = [k for k in ("step", "optimizer", "rng", "streams", "history") if k not in state]
    if missing:
        raise CheckpointError(f"{state_file}: truncated or corrupted (no {', '.join(missing)})")
    _verify_files(path, state.get("files", {}))
    return Checkpoint(
        path=path,
        state=state,
        trainable=_load_tensors(path / TRAINABLE_FILE),
        optimizer_tensors=_load_tensors(path / OPTIMIZER_FILE),
        rng_tensors=_load_tensors(path / RNG_FILE),
    )


def find_resumable(output_dir: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint to resume from in ``output_dir``: the newest that reads whole. Each newer one
    that does not is named in a warning with what is wrong with it; ``None`` when there is none,
    and :class:`CheckpointError` when there are checkpoints but none reads."""
    bad: list[str] = []
    for path in _candidates(Path(output_dir)):
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            bad.append(str(err))
            continue
        for reason in bad:
            warnings.warn(f"skipping a damaged checkpoint: {reason}; resuming from {path} instead", stacklevel=2)
        return ckpt
    if bad:
        raise CheckpointError(f"no usable checkpoint in {output_dir}: " + "; ".join(bad))
    return None


# --------------------------------------------------------------------------------------------
# before a run


def checkpoint_bytes(tensors: Mapping[str, torch.Tensor], adapter_bytes: int = 0, optimizer_slots: int = 2) -> int:
    """About how many bytes one checkpoint of ``tensors`` takes: the tensors, the optimizer's
    ``optimizer_slots`` fp32 moments of each trainable one (``param.*``), and the adapter files."""
    total = adapter_bytes + (1 << 20)  # RNG states and JSON
    for name, t in tensors.items():
        total += t.numel() * t.element_size()
        if name.startswith("param."):
            total += optimizer_slots * t.numel() * 4
    return total


def check_output_dir(output_dir: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Make sure checkpoints can be written to ``output_dir`` before any work starts: it is created
    if needed, a probe file is written and removed, and at least ``need_bytes`` must be free.
    Raises :class:`OutputDirError` saying which of these failed."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nsru-write-test-", dir=out)
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"output_dir {out} is not writable ({type(err).__name__}: {err.strerror or err}); "
                             "nothing was trained. Choose another output folder.") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise OutputDirError(
            f"output_dir {out} has {free / 2**20:.1f} MiB free but the run's checkpoints need about "
            f"{need_bytes / 2**20:.1f} MiB; nothing was trained. Free some space, lower keep_checkpoints, or "
            "choose another output folder.")
    return out
