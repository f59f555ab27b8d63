"""The plain-PyTorch trainer: AdamW, warm-up and schedule, gradient accumulation, clipping, bf16
autocast on CUDA, checkpoints with exact resume, a NaN/Inf guard, and data parallelism under
``torchrun`` (optionally with the frozen base weights sharded by FSDP).

Data parallelism: each process computes its share of the global batch. Every loss divides its sum
over tokens (or sequences) by the count of the *whole global batch* — all micro-batches on all
processes, found with one all-reduce of the counts before the step (``LossContext.denom``) — so
the per-micro-batch, per-process losses add up to the one-process loss of the global batch, and
the gradients of the trainable parameters are *summed* with one ``all_reduce`` before the
optimizer step. N processes, or k micro-batches, therefore give the adapter of one process on one
batch up to floating-point reduction order. (A step runs several forwards of the same model —
policy, reference with adapters disabled, retain — which DDP's per-forward hooks do not support
without extra flags; an explicit all-reduce of the few adapter gradients gives the same update.)
A loss that never asks ``ctx.denom`` averages over its own shard; it is then divided by the number
of shards (the mean of per-shard means, exact only for equal shards): each term of
``LossContext.weighted`` on its own, a method's own differentiable ``"loss"`` as a whole.

One step of NSRU runs several forwards of the same model (safe target, forget, retain). Each loss
term's backward runs as soon as the term is computed (``LossContext.weighted``), so the step holds
the activations of one forward at a time; every adapter forms ``Ã`` once for the step, and the
``lora_A`` gradients of all modules are projected once, after the all-reduce, in one
``project_rows_`` call (:func:`nsru.layer.null_space_step`). Both give the gradients of one backward
of the summed loss up to floating-point order. A registered method whose terms do not go through
``LossContext.weighted`` returns a differentiable ``"loss"``, and its one backward runs as before.

``config.fsdp``: the base weights are sharded with ``torch.distributed.fsdp.fully_shard``, one
unit per transformer block, and gathered block by block in the forward and backward; the
adapters stay whole on every process, so everything above holds unchanged
(:func:`nsru.distributed.shard_model`).

The pieces it runs on live beside it: :mod:`nsru.sampler` (the batches), :mod:`nsru.schedule`
(the learning rate), :mod:`nsru.checkpoint` (the files of a checkpoint, written by rank 0) and
:mod:`nsru.distributed` (the process group).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nsru.checkpoint import (
    Checkpoint,
    OutputDirError,
    check_output_dir,
    checkpoint_bytes,
    find_resumable,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from nsru.distributed import (
    all_reduce_sum_,
    any_process,
    barrier,
    dist_info,
    gather_strings,
    is_sharded,
    run_on_rank0,
    shard_model,
)
from nsru.frozen_prefix import FrozenPrefix
from nsru.layer import null_space_step, project_gradients_
from nsru.objectives import batch_counts
from nsru.sampler import Stream, split
from nsru.schedule import ScheduleError, check_resume, lr_scheduler, restore_scheduler
from nsru.sharpness import WeightAscent

COUNT_KINDS = ("tokens", "sequences", "positions")


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient became NaN/Inf; training stopped before applying it."""


# --------------------------------------------------------------------------------------------
# trainer


class Trainer:
    """Runs ``config.steps`` optimizer steps of ``method``'s loss.

    ``streams``: ``{"forget": Stream, "retain": Stream}`` (retain optional); each yields examples
    whose parts (``forget``/``safe``/``retain``) are encodings. ``params``: the trainable
    parameters by name. ``eval_fn(model, step) -> dict`` runs every ``config.eval_every`` steps;
    its results go into the history; ``stop_fn(model, step) -> dict`` likewise every
    ``config.stop_every`` steps, and training ends when its ``"stop"`` is true. ``adapters``: the
    NSRU layers (their ``lora_A`` is kept in the null space after each step, and their files are
    written in each checkpoint).

    Before anything runs, ``config.output_dir`` (when set) must take a file and have room for
    the checkpoints (:func:`nsru.checkpoint.check_output_dir`).
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
        stop_fn: Callable | None = None,
    ) -> None:
        self.model = model
        self.cfg = config
        self.method = method
        self.ctx = ctx
        self.streams = dict(streams)
        self.params = dict(params)
        self.adapters = dict(adapters or {})
        trainable = {id(p) for p in self.params.values()}
        # the layers whose lora_A this trainer updates: each forms Ã once per step, and their
        # gradients are projected once per step (null_space_step), not in every backward
        self._projected = [m for m in self.adapters.values() if id(m.lora_A) in trainable]
        self.eval_fn = eval_fn
        self.stop_fn = stop_fn
        self.rank, self.world = dist_info()
        per_rank, rest = divmod(config.batch_size, self.world * config.grad_accum)
        if rest or per_rank == 0:
            raise ValueError(
                f"batch_size {config.batch_size} (the global batch) must be a multiple of world size {self.world} "
                f"× grad_accum {config.grad_accum}"
            )
        if not self.params:
            raise ValueError("no trainable parameters: nothing to unlearn with")
        self.output_dir = Path(config.output_dir) if config.output_dir else None
        if self.output_dir is not None:
            run_on_rank0(lambda: check_output_dir(self.output_dir, self._checkpoint_room()), OutputDirError)
        if getattr(config, "fsdp", False):
            shard_model(model, keep_whole=self.params.values())
        if is_sharded(model):
            # The frozen-prefix cache calls the embeddings and lower blocks outside the root's
            # forward, where FSDP has not gathered them; run whole forwards instead.
            ctx.prefix = None
        elif ctx.prefix is None and ctx.ref_model is None:
            ctx.prefix = FrozenPrefix.find(model)  # adapters above a frozen bottom: run it once per sequence
        self.device = next(iter(self.params.values())).device
        if config.sam_rho and not self._projected:
            raise ValueError(f"sam_rho={config.sam_rho:g} moves the base weights of trained adapters, and this run "
                             "trains none (finetune='full', or no adapter parameter among params)")
        self._ascent = WeightAscent(self._projected) if config.sam_rho else None
        decay, no_decay = [], []
        for name, p in self.params.items():
            (no_decay if p.dim() < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps)
        self.scheduler = lr_scheduler(self.optimizer, config)
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None

    def _checkpoint_room(self) -> int:
        """Bytes the checkpoints still need in ``output_dir``: one more than ``keep_checkpoints``
        exist at once (the new one is written before the oldest is removed)."""
        tensors = {f"param.{n}": p for n, p in self.params.items()}
        tensors.update({f"basis.{n}": layer.retain_basis for n, layer in self.adapters.items()})
        adapter = sum(4 * (layer.lora_A.numel() + layer.lora_B.numel() + layer.retain_basis.numel())
                      for layer in self.adapters.values())
        present = len(list(self.output_dir.glob("checkpoint-*"))) if self.output_dir.is_dir() else 0
        return max(1, self.cfg.keep_checkpoints + 1 - present) * checkpoint_bytes(tensors, adapter)

    # ---- one step

    def _autocast(self):
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @property
    def _shards(self) -> int:
        """Micro-batches of the global batch over all processes."""
        return self.cfg.grad_accum * self.world

    def _term_backward(self, term: torch.Tensor, used_denom: bool) -> None:
        """The backward of one weighted loss term (``LossContext.weighted`` calls it), outside
        autocast like any backward; a term that never asked ``ctx.denom`` averaged over its own
        shard and is divided by the number of shards."""
        if not used_denom:
            term = term / self._shards
        if term.requires_grad:
            with torch.autocast(self.device.type, enabled=False) if self.cfg.bf16 else nullcontext():
                term.backward()

    def _micro_batches(self) -> list[dict]:
        """This process's micro-batches of the next global batch: ``[{part: tensors}, ...]``."""
        accum = self.cfg.grad_accum
        parts: list[dict] = [{} for _ in range(accum)]
        for stream in self.streams.values():
            mine = stream.next_indices()[self.rank::self.world]
            for i, chunk in enumerate(split(mine, accum)):
                for key, enc in stream.collate(chunk).items():
                    parts[i][key] = {k: v.to(self.device) for k, v in enc.items()}
        return parts

    def _global_counts(self, micro: list[dict]) -> dict[str, dict[str, float]]:
        """Tokens, sequences and positions of every part over the global batch (one all-reduce)."""
        parts = sorted({part for batch in micro for part in batch})
        local = torch.zeros(len(parts), len(COUNT_KINDS), dtype=torch.float64, device=self.device)
        for batch in micro:
            for i, part in enumerate(parts):
                if part in batch:
                    c = batch_counts(batch[part]["labels"], batch[part].get("attention_mask"))
                    local[i] += torch.stack([c[k].to(local) for k in COUNT_KINDS])
        all_reduce_sum_([local])
        return {part: dict(zip(COUNT_KINDS, row)) for part, row in zip(parts, local.tolist())}

    def _stop(self, where: str, what: str, module: str) -> None:
        kept = str(self.last_checkpoint) if self.last_checkpoint else (
            "none was written (set output_dir and save_every to keep one)")
        raise NonFiniteLossError(
            f"non-finite {where} at step {self.step + 1} ({what}) {module}; stopped before applying it. The model "
            f"holds the weights of step {self.step}; last good checkpoint: {kept}. Lower lr, raise beta, or enable "
            "clipping."
        )

    def _check_loss(self, terms: Mapping[str, torch.Tensor], batch: Mapping[str, dict]) -> None:
        bad = [k for k, v in terms.items() if v is not None and not bool(torch.isfinite(v).all())]
        if not any_process(bool(bad), self.device):
            return
        module = self._locate_nonfinite(batch)  # every process runs it: its forwards may be collective
        what = ", ".join(f"{k} = {float(terms[k].detach()):g}" for k in bad) if bad else "on another process"
        found = [m for m in dict.fromkeys(gather_strings(module if bad else "")) if m]
        self._stop("loss", what, "; ".join(found) or module)

    @torch.no_grad()
    def _locate_nonfinite(self, batch: Mapping[str, dict]) -> str:
        """Where a NaN/Inf comes from: a trainable parameter, else the first module whose output
        is non-finite when the batch's parts run again (the policy, then the reference), else the
        loss itself."""
        for name, p in self.params.items():  # identical on every process, so all return here together
            if not bool(torch.isfinite(p).all()):
                return f"in parameter {name!r} (module {name.rsplit('.', 1)[0]!r})"
        found: list[str] = []

        def hook(name: str):
            def check(module, args, output):
                t = output[0] if isinstance(output, (tuple, list)) else output
                if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(
                        torch.isfinite(t).all()):
                    found.append(name)
            return check

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules() if n]
        try:
            for forward in (self.ctx.forward, self.ctx.ref_forward):
                for part, enc in batch.items():
                    with self._autocast():
                        forward(enc)
                    if found:
                        return f"in module {found[0]!r} (the first output with NaN/Inf, on the {part} batch" + (
                            ", adapters disabled)" if forward == self.ctx.ref_forward else ")")
        finally:
            for h in handles:
                h.remove()
        return "in the loss itself (every module's output is finite on this batch)"

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = self.optimizer.param_groups[0]["lr"]  # this step's, set by the scheduler
        self.optimizer.zero_grad(set_to_none=True)
        micro = self._micro_batches()
        self.ctx.counts = self._global_counts(micro)
        sums: dict[str, float] = {}
        self.ctx.term_backward = self._term_backward  # each term's backward before the next term's forward
        try:
            if self._ascent is None:
                self._accumulate(micro, sums)
            else:
                self._sharpness_aware(micro, sums)
        finally:
            self.ctx.counts = None
            self.ctx.term_backward = None
            self.ctx.term_filter = None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params.values()]
        for p, g in zip(self.params.values(), grads):
            p.grad = g
        all_reduce_sum_(grads)
        project_gradients_(self._projected)  # ∂L/∂A = (∂L/∂Ã) P⊥ once for the step, after the all-reduce
        if cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not bool(torch.isfinite(norm)):  # identical on every process: the gradients were all-reduced
            bad = [n for n, p in self.params.items() if not bool(torch.isfinite(p.grad).all())]
            modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in bad))
            self._stop("gradient", f"gradient norm = {float(norm):g}",
                       f"in module {modules[0]!r}" + (f" and {len(modules) - 1} more" if len(modules) > 1 else ""))
        self.optimizer.step()
        self.scheduler.step()
        self._reproject()
        self.step += 1
        logged = torch.tensor(list(sums.values()), dtype=torch.float64, device=self.device)
        all_reduce_sum_([logged])
        record = {"step": self.step, "lr": lr, **dict(zip(sums, logged.tolist())), "grad_norm": float(norm)}
        self.history.append(record)
        return record

    def _accumulate(self, micro: list[dict], sums: dict[str, float]) -> None:
        """Forward and backward of the loss (the terms ``ctx.term_filter`` passes) over ``micro``; the
        gradients add up in ``.grad``, the detached term values in ``sums``."""
        with null_space_step(self._projected, project_grads=False):
            for batch in micro:
                self.ctx.counts_used = False
                with self._autocast():
                    terms = self.method.loss(self.ctx, batch)
                if not self.ctx.counts_used:  # a loss that averages over its own shard
                    terms = {k: v / self._shards for k, v in terms.items() if v is not None}
                self._check_loss(terms, batch)
                if terms["loss"].requires_grad:  # a method's own loss, or what it added to ctx.weighted's
                    terms["loss"].backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())

    def _sharpness_aware(self, micro: list[dict], sums: dict[str, float]) -> None:
        """``sam_rho > 0``: the suppression term's gradient at the adapted base weights moved by
        ``sam_rho`` along the sign of its own weight gradient, the other terms' at the true weights
        (:mod:`nsru.sharpness`); ``sums["sam_grad_norm"]``: ‖∂L_suppress/∂W‖."""
        self.ctx.term_filter = lambda name: name == "suppress"
        with self._ascent.gathering():
            self._accumulate(micro, {})
        self.optimizer.zero_grad(set_to_none=True)
        with self._ascent.moved(self.cfg.sam_rho) as norm:
            self._accumulate(micro, sums)
        self.ctx.term_filter = lambda name: name != "suppress"
        self._accumulate(micro, sums)  # "loss" adds up over the two passes
        sums["sam_grad_norm"] = norm / self.world  # the same on every process; the history sums them

    @torch.no_grad()
    def _reproject(self) -> None:
        """Keep ``lora_A`` in the null space (AdamW's per-element scaling would otherwise let it
        drift into span(U); harmless for the output, since Ã projects, but wasteful)."""
        layers = [m for m in self.adapters.values() if m.k]
        if layers:
            from nsru.ops import project_rows_

            project_rows_([m.lora_A for m in layers], [m.retain_basis for m in layers])

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
                    record["eval"] = self._evaluate(self.eval_fn)
                if self.output_dir and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                if self.stop_fn is not None and self.step % cfg.stop_every == 0:
                    record["stop_check"] = self._evaluate(self.stop_fn)
                    if record["stop_check"]["stop"]:
                        break
            if self.output_dir and (not self.last_checkpoint or not self.last_checkpoint.name.endswith(f"-{self.step}")):
                self.save_checkpoint()
        finally:
            bar.close()
            self.model.train(was_training)
        return self.history

    def _evaluate(self, fn: Callable) -> dict:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), null_space_step(self.adapters.values()):  # Ã once, not at every forward
                return fn(self.model, self.step) or {}
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

        def write() -> None:
            state = {
                "method": self.method.name,
                "world_size": self.world,
                "streams": {k: s.state_dict() for k, s in self.streams.items()},
                "scheduler": self.scheduler.state_dict(),
                "method_state": {k: v for k, v in self.ctx.state.items() if not isinstance(v, torch.Tensor)},
                "config": self.cfg.to_dict(),
                "history": self.history,
            }
            save_checkpoint(self.output_dir, self.step, trainable=self._trainable_tensors(), optimizer=self.optimizer,
                            state=state, adapter_model=self.model if self.adapters else None,
                            keep=self.cfg.keep_checkpoints)

        run_on_rank0(write, OutputDirError)
        self.last_checkpoint = final
        return final

    def _resume(self) -> None:
        cfg = self.cfg
        if isinstance(cfg.resume, str):
            self.load_checkpoint(cfg.resume)
            return
        if self.output_dir is None:
            raise ValueError("resume=True needs output_dir (or pass the checkpoint path as resume)")
        if self.rank == 0:
            remove_stale_temporaries(self.output_dir)  # left by a run killed while writing
        barrier()
        ckpt = find_resumable(self.output_dir)  # names and skips damaged checkpoints
        if ckpt is not None:
            self._restore(ckpt)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore parameters, bases, optimizer, data positions, RNG and history from ``path``."""
        self._restore(read_checkpoint(path))

    def _restore(self, ckpt: Checkpoint) -> None:
        path, state, tensors = ckpt.path, ckpt.state, ckpt.trainable
        try:
            check_resume(state, self.cfg)  # before anything is restored: the schedule must continue
        except ScheduleError as err:
            raise ScheduleError(f"{path}: {err}") from None
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
        ckpt.restore_optimizer(self.optimizer)
        for name, s in state["streams"].items():
            if name in self.streams:
                self.streams[name].load_state_dict(s)
        ckpt.restore_rng()
        self.step = int(state["step"])
        # The optimizer's LR came back as the checkpoint's; the schedule (of steps=cfg.steps) sets it.
        restore_scheduler(self.scheduler, state, self.cfg)
        self.history = list(state["history"])
        self.last_checkpoint = path
