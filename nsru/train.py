"""The plain-PyTorch trainer: AdamW, warm-up and schedule, gradient accumulation, clipping, bf16
autocast on CUDA, checkpoints with exact resume, a NaN/Inf guard, and data parallelism under
``torchrun``.

Data parallelism: each process computes its share of the global batch and the gradients of the
trainable parameters are averaged with one ``all_reduce`` before the optimizer step. (A step runs
several forwards of the same model — policy, reference with adapters disabled, retain — which
DDP's per-forward hooks do not support without extra flags; an explicit all-reduce of the few
adapter gradients gives the same update.) ``batch_size`` is the global batch, so a run gives the
same result on any number of processes up to floating-point reduction order.

Checkpoints (``output_dir/checkpoint-<step>/``, written to a temporary folder and renamed, rank 0
only): ``trainable.safetensors`` (trainable parameters, retain bases, method state),
``adapter/`` (``nsru.save_adapter``'s files, adapter runs only), ``optimizer.safetensors``
(AdamW's state tensors), ``rng.safetensors`` (torch RNG states) and ``trainer_state.json``
(step, data positions, optimizer scalars, Python/NumPy RNG, history). Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from nsru.data import pad_encodings

CHECKPOINT_FORMAT = "nsru-checkpoint"
LATEST = "latest"


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient became NaN/Inf; training stopped before applying it."""


# --------------------------------------------------------------------------------------------
# distributed helpers


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and not yet
    initialised: NCCL on CUDA, gloo otherwise. Returns whether a process group is active."""
    if not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    rank, world = dist_info()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------
# data streams


class Stream:
    """Deterministic batches from a list of examples.

    Each epoch is a permutation drawn from ``(seed, salt, epoch)``; a step takes the next
    ``batch_size`` indices of the global order (wrapping into the next epoch), and this process
    takes every ``world``-th of them. The state is two integers, so resuming is exact.
    """

    def __init__(self, examples: Sequence[Mapping], batch_size: int, seed: int = 0, salt: int = 0, pad_id: int = 0):
        if not examples:
            raise ValueError("cannot draw batches from an empty dataset")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.salt = salt
        self.pad_id = pad_id
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.salt * 7_919 + epoch) % (2**63))
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= len(self._perm):
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), len(self._perm) - self.pos)
            out.extend(self._perm[self.pos:self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._perm = self._permutation(self.epoch)

    def collate(self, indices: Sequence[int]) -> dict[str, dict[str, torch.Tensor]]:
        """Pad every part (``forget``, ``safe``, ``retain``...) of the chosen examples."""
        rows = [self.examples[i] for i in indices]
        return {key: pad_encodings([r[key] for r in rows], self.pad_id) for key in rows[0]}


def _split(indices: list[int], parts: int) -> list[list[int]]:
    size = len(indices) // parts
    return [indices[i * size:(i + 1) * size] for i in range(parts)]


# --------------------------------------------------------------------------------------------
# schedule


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    warm = cfg.warmup_steps
    warm = int(round(warm * cfg.steps)) if warm < 1 else int(warm)
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - warm)
    progress = min(1.0, (step - warm) / span)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


# --------------------------------------------------------------------------------------------
# checkpoint files


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
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


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
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


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (``None`` when there is none)."""
    out = Path(output_dir)
    pointer = out / LATEST
    if pointer.is_file():
        path = out / pointer.read_text().strip()
        if (path / "trainer_state.json").is_file():
            return path
    found = sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()
         and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------
# trainer


class Trainer:
    """Runs ``config.steps`` optimizer steps of ``method``'s loss.

    ``streams``: ``{"forget": Stream, "retain": Stream}`` (retain optional); each yields examples
    whose parts (``forget``/``safe``/``retain``) are encodings. ``params``: the trainable
    parameters by name. ``eval_fn(model, step) -> dict`` runs every ``config.eval_every`` steps;
    its results go into the history. ``adapters``: the NSRU layers (their ``lora_A`` is kept in
    the null space after each step, and their files are written in each checkpoint).
    """

    def __init__(
        self,
        model: nn.Module,
        config,
        method,
        ctx,
        streams: Mapping[str, Stream],
        params: Mapping[str, nn.Parameter],
        *,
        adapters: Mapping | None = None,
        eval_fn: Callable | None = None,
        extra_state: Mapping | None = None,
    ) -> None:
        self.model = model
        self.cfg = config
        self.method = method
        self.ctx = ctx
        self.streams = dict(streams)
        self.params = dict(params)
        self.adapters = dict(adapters or {})
        self.eval_fn = eval_fn
        self.extra_state = dict(extra_state or {})
        self.rank, self.world = dist_info()
        per_rank, rest = divmod(config.batch_size, self.world * config.grad_accum)
        if rest or per_rank == 0:
            raise ValueError(
                f"batch_size {config.batch_size} (the global batch) must be a multiple of world size {self.world} "
                f"× grad_accum {config.grad_accum}"
            )
        if not self.params:
            raise ValueError("no trainable parameters: nothing to unlearn with")
        self.device = next(iter(self.params.values())).device
        decay, no_decay = [], []
        for name, p in self.params.items():
            (no_decay if p.dim() < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps)
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.output_dir = Path(config.output_dir) if config.output_dir else None

    # ---- one step

    def _autocast(self):
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _micro_batches(self) -> list[dict]:
        """This process's micro-batches of the next global batch: ``[{part: tensors}, ...]``."""
        accum = self.cfg.grad_accum
        parts: list[dict] = [{} for _ in range(accum)]
        for stream in self.streams.values():
            mine = stream.next_indices()[self.rank::self.world]
            for i, chunk in enumerate(_split(mine, accum)):
                for key, enc in stream.collate(chunk).items():
                    parts[i][key] = {k: v.to(self.device) for k, v in enc.items()}
        return parts

    def _check_finite(self, terms: Mapping[str, torch.Tensor], where: str) -> None:
        bad = [k for k, v in terms.items() if v is not None and not bool(torch.isfinite(v).all())]
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag)
        if flag.item() > 0:
            kept = str(self.last_checkpoint) if self.last_checkpoint else (
                "none was written (set output_dir and save_every to keep one)")
            what = ", ".join(f"{k} = {float(terms[k].detach()):g}" for k in bad) if bad else "on another process"
            raise NonFiniteLossError(
                f"non-finite {where} at step {self.step + 1} ({what}); stopped before applying it. The model holds the "
                f"weights of step {self.step}; last good checkpoint: {kept}. Lower lr, raise beta, or enable clipping."
            )

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for batch in self._micro_batches():
            with self._autocast():
                terms = self.method.loss(self.ctx, batch)
            self._check_finite(terms, "loss")
            (terms["loss"] / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params.values()]
        for p, g in zip(self.params.values(), grads):
            p.grad = g
        _all_reduce_mean_(grads)
        if cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self._check_finite({"gradient norm": norm}, "gradient")
        self.optimizer.step()
        self._reproject()
        self.step += 1
        logged = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        _all_reduce_mean_([logged])
        record = {"step": self.step, "lr": lr, **dict(zip(sums, logged.tolist())), "grad_norm": float(norm)}
        self.history.append(record)
        return record

    @torch.no_grad()
    def _reproject(self) -> None:
        """Keep ``lora_A`` in the null space (AdamW's per-element scaling would otherwise let it
        drift into span(U); harmless for the output, since Ã projects, but wasteful)."""
        layers = [m for m in self.adapters.values() if m.k]
        if layers:
            from nsru.ops import project_rows_

            project_rows_([m.lora_A.data for m in layers], [m.retain_basis for m in layers])

    # ---- loop

    def train(self) -> list[dict]:
        cfg = self.cfg
        if cfg.resume:
            self._resume()
        self._broadcast_params()
        was_training = self.model.training
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"unlearn[{self.method.name}]",
                   disable=not cfg.progress or self.rank != 0, dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "lr", "grad_norm")})
                if cfg.eval_every and self.eval_fn is not None and self.step % cfg.eval_every == 0:
                    record["eval"] = self._evaluate()
                if self.output_dir and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            if self.output_dir and (not self.last_checkpoint or not self.last_checkpoint.name.endswith(f"-{self.step}")):
                self.save_checkpoint()
        finally:
            bar.close()
            self.model.train(was_training)
        return self.history

    def _evaluate(self) -> dict:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.eval_fn(self.model, self.step) or {}
        finally:
            self.model.train(was)

    def _broadcast_params(self) -> None:
        if self.world > 1:
            for p in self.params.values():
                torch.distributed.broadcast(p.data, src=0)

    # ---- checkpoints

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"param.{n}": p.detach().cpu().clone() for n, p in self.params.items()}
        for name, layer in self.adapters.items():
            out[f"basis.{name}"] = layer.retain_basis.detach().cpu().clone()
        for key, value in self.ctx.state.items():
            if isinstance(value, torch.Tensor):
                out[f"method.{key}"] = value.detach().cpu().clone()
        return out

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically (rank 0); all processes wait for it."""
        if self.output_dir is None:
            raise ValueError("save_checkpoint needs config.output_dir")
        final = self.output_dir / f"checkpoint-{self.step}"
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.output_dir / f".checkpoint-{self.step}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            save_file(self._trainable_tensors(), str(tmp / "trainable.safetensors"))
            if self.adapters:
                from nsru.adapt import save_adapter

                save_adapter(self.model, tmp / "adapter")
            opt_tensors, opt_meta = _optimizer_to_files(self.optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            rng_tensors, rng_meta = _rng_state()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": 1,
                "step": self.step,
                "method": self.method.name,
                "world_size": self.world,
                "streams": {k: s.state_dict() for k, s in self.streams.items()},
                "optimizer": opt_meta,
                "rng": rng_meta,
                "method_state": {k: v for k, v in self.ctx.state.items() if not isinstance(v, torch.Tensor)},
                "extra": self.extra_state,
                "config": self.cfg.to_dict(),
                "history": self.history,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._write_latest(final)
            self._prune()
        _barrier()
        self.last_checkpoint = final
        return final

    def _write_latest(self, final: Path) -> None:
        tmp = self.output_dir / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        os.replace(tmp, self.output_dir / LATEST)

    def _prune(self) -> None:
        keep = max(1, int(self.cfg.keep_checkpoints))
        found = sorted(
            (p for p in self.output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        cfg = self.cfg
        if isinstance(cfg.resume, str):
            path = Path(cfg.resume)
        elif self.output_dir is not None:
            path = latest_checkpoint(self.output_dir)
            if path is None:
                return  # nothing to resume from: start fresh
        else:
            raise ValueError("resume=True needs output_dir (or pass the checkpoint path as resume)")
        self.load_checkpoint(path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore parameters, bases, optimizer, data positions, RNG and history from ``path``."""
        path = Path(path)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint (no trainer_state.json)")
        state = json.loads(state_file.read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{state_file}: not an NSRU checkpoint")
        tensors = load_file(str(path / "trainable.safetensors"))
        with torch.no_grad():
            for name, p in self.params.items():
                key = f"param.{name}"
                if key not in tensors:
                    raise ValueError(f"{path}: checkpoint has no parameter {name!r}")
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise ValueError(f"{path}: parameter {name!r} has shape {tuple(tensors[key].shape)}, "
                                     f"the model needs {tuple(p.shape)}")
                p.copy_(tensors[key])
            for name, layer in self.adapters.items():
                key = f"basis.{name}"
                if key in tensors:
                    layer.retain_basis = tensors[key].to(layer.lora_A.device, torch.float32)
        for key, value in tensors.items():
            if key.startswith("method."):
                self.ctx.state[key[len("method."):]] = value
        self.ctx.state.update(state.get("method_state", {}))
        _optimizer_from_files(self.optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        for name, s in state["streams"].items():
            if name in self.streams:
                self.streams[name].load_state_dict(s)
        _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.last_checkpoint = path
