"""Retain subspaces: input statistics of the adapted modules, their eigenbases, leakage, and the
bases file.

For each adapted module the retain statistic is the uncentered second moment of its inputs over
every non-pad token of benign data, ``C = (1/N) Σ h hᵀ``. Modules that read the same tensor (q, k
and v; gate and up) share one statistic. The retain basis holds the top eigenvectors of ``C``.

The bases file (a folder, written by ``nsru subspace`` and read by ``nsru.unlearn(bases=...)``):
``bases.safetensors`` (the retain basis U, in × k, of every group of modules that read the same
tensor, under the group's first module name), ``moments.safetensors`` (the statistics they came
from, per group a sum and a count), ``subspace.json`` (format ``nsru-subspace``, the modules, their
groups, the rule and the data) and ``basis_report.json`` (k and leakage per module).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nsru import ops
from nsru.atomic import atomic_write
from nsru.distributed import all_reduce_mean_, all_reduce_sum_
from nsru.layer import NSRULinear, adapter_disabled, model_device, nsru_modules

FLUSH_BYTES = 256 * 2**20  # collect_second_moments flushes the module inputs it holds at this size


@dataclass
class SecondMoments:
    """Accumulated retain statistics.

    ``sums[key]`` is ``Σ h hᵀ`` (upper triangle valid) and ``tokens[key]`` the token count of one
    group of modules that read the same tensor; ``groups`` maps every module name to its group key.
    Sums and counts are plain tensors, so ``all_reduce`` (or adding another run's statistics)
    combines data from several processes or sessions.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The normalised symmetric statistic ``C`` of module ``name``."""
        key = self.groups[name]
        n = float(self.tokens[key])
        return ops.symmetrize(self.sums[key]) / max(n, 1.0)

    def __contains__(self, name: object) -> bool:
        return name in self.groups

    def __len__(self) -> int:
        return len(self.groups)

    def names(self) -> list[str]:
        return list(self.groups)

    def all_reduce(self, group=None) -> SecondMoments:
        """Sum the statistics over the processes of ``torch.distributed`` (no-op when not initialised),
        so that every process computes the same bases from the statistics of all the data."""
        all_reduce_sum_([*self.sums.values(), *self.tokens.values()], group=group)
        return self

    def normalize_(self) -> SecondMoments:
        """Turn the sums into means (``C``) counted as one token each, so that adding several
        normalised collections weighs each equally whatever its size."""
        for key in self.sums:
            self.sums[key] /= max(float(self.tokens[key]), 1.0)
            self.tokens[key].fill_(1.0)
        return self

    def add_(self, other: SecondMoments) -> SecondMoments:
        """Add another collection's statistics (the same modules) into this one, e.g. new retain data."""
        if other.groups != self.groups:
            raise ValueError("cannot add second moments of different modules or groupings")
        for key in self.sums:
            self.sums[key] += other.sums[key].to(self.sums[key])
            self.tokens[key] += other.tokens[key].to(self.tokens[key])
        return self


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.numel() * x.shape[-1] != x.numel():
        return None
    return mask.reshape(-1)


class _StopForward(Exception):
    """Raised by a hooked pass once every hooked module has read its input: the rest of the forward
    (later blocks, the output head, the vocabulary-wide logits) computes nothing the pass reads."""


def _can_stop_early(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may be cut short by an exception: not where hooks around the
    forward gather and release weights and would be left half done (FSDP's units, accelerate's
    offloading)."""
    sharded: tuple = ()
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # FSDP needs a process group
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        sharded = (FSDPModule, FullyShardedDataParallel)
    for m in model.modules():
        if sharded and isinstance(m, sharded):
            return False
        hook = getattr(m, "_hf_hook", None)
        if hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            return False
    return True


def _no_cache(model: nn.Module) -> dict:
    """``use_cache=False`` where ``model.forward`` takes it (transformers' models): a hooked pass
    reads module inputs only, so the key/value cache of every layer need not be kept."""
    try:
        import inspect

        return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}


def _run_hooked(
    model: nn.Module,
    batches: Iterable[Mapping],
    hooks: Mapping[nn.Module, Callable],
    desc: str,
    progress: bool,
    before_forward: Callable[[Mapping], None],
    after_forward: Callable[[], None] = lambda: None,
    total: int | None = None,
) -> None:
    """Forward every batch through the original model (eval mode, no gradients, adapters disabled,
    no key/value cache) with ``hooks`` installed as forward pre-hooks; the model's mode is restored
    afterwards. A forward stops as soon as every hooked module has read its input (in the pre-hook
    of the last one), so neither the modules after it nor the output head and its logits run — an
    adapted output head still reads its input first. A module that runs twice in one forward is
    seen on its first call only where every module has run by then; FSDP-sharded and offloaded
    models run whole forwards."""
    seen: set[int] = set()
    stop = _can_stop_early(model)

    def hooked(fn: Callable) -> Callable:
        def pre_hook(module, args):
            fn(module, args)
            if stop:
                seen.add(id(module))
                if len(seen) == len(hooks):
                    raise _StopForward

        return pre_hook

    handles = [m.register_forward_pre_hook(hooked(h)) for m, h in hooks.items()]
    device = model_device(model)
    extra = _no_cache(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_disabled(model):
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False, total=total):
                batch = _to_device(batch, device)
                before_forward(batch)
                seen.clear()
                try:
                    model(**{**extra, **batch})
                except _StopForward:
                    pass
                after_forward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def collect_second_moments(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    modules: Mapping[str, nn.Module] | None = None,
    dtype: torch.dtype = torch.float32,
    into: SecondMoments | None = None,
    progress: bool = True,
    desc: str = "retain statistics",
) -> SecondMoments:
    """Accumulate the input second moment of every adapted module over ``batches``: raw sums
    and token counts of this process (``.all_reduce()`` adds the other processes', ``.normalize_()``
    turns sums into means; :func:`nsru.stats_sources.global_source_means` does both per source).

    ``batches`` yields dicts for ``model(**batch)``; tokens where ``attention_mask`` is 0 are left
    out. Runs the model without gradients and with its adapters disabled, so the statistics
    describe the original model. Pass ``into`` to add to statistics collected earlier. With
    ``progress`` a bar named ``desc`` counts the batches.
    """
    modules = dict(modules) if modules is not None else nsru_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no NSRU adapters; call nsru.apply_nsru() first")
    stats = into if into is not None else SecondMoments()
    # Groups (modules fed the very same tensor) are found on the first batch of a new collection.
    state = {"mask": None, "seen": [], "pending": [], "bytes": 0, "done": set(), "grouping": not stats.groups}

    def flush() -> None:
        if state["pending"]:
            moments, inputs, masks = zip(*state["pending"])
            ops.second_moment_(list(moments), list(inputs), list(masks))
            state["pending"].clear()
            state["bytes"] = 0

    def hook(name: str):
        def pre_hook(module, args):
            x = args[0].detach()
            if state["grouping"] and name not in stats.groups:
                key = next((k for k, t in state["seen"] if t is args[0]), None)
                if key is None:
                    key = name
                    state["seen"].append((name, args[0]))
                stats.groups[name] = key
            key = stats.groups[name]
            if key in state["done"]:
                return
            state["done"].add(key)
            if key not in stats.sums:
                stats.sums[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
                stats.tokens[key] = torch.zeros((), dtype=torch.float64, device=x.device)
            mask = _row_mask(x, state["mask"])
            stats.tokens[key] += mask.sum() if mask is not None else x.numel() // x.shape[-1]
            state["pending"].append((stats.sums[key], x, mask))
            state["bytes"] += x.numel() * x.element_size()
            if state["bytes"] >= FLUSH_BYTES:
                flush()

        return pre_hook

    def before_forward(batch: Mapping) -> None:
        state["mask"] = batch.get("attention_mask")
        state["done"].clear()

    def after_forward() -> None:
        flush()
        state["seen"].clear()
        state["grouping"] = False

    hooks = {m: hook(n) for n, m in modules.items()}
    _run_hooked(model, batches, hooks, desc, progress, before_forward, after_forward)
    missing = [n for n in modules if n not in stats.groups]
    if missing:
        raise ValueError(
            f"no retain statistics for {len(missing)} adapted modules (e.g. {missing[0]!r}): "
            "they never ran during the forward passes, or no batch was given"
        )
    return stats


def retain_subspaces(
    moments: SecondMoments, rule: ops.SubspaceRule | str | float = ops.DEFAULT_RULE
) -> dict[str, ops.Subspace]:
    """The retain subspace of every module (one eigendecomposition per group of modules), sized
    by ``rule`` (:class:`nsru.ops.SubspaceRule` or its string, e.g. ``"energy=0.9"``)."""
    keys = list(moments.sums)
    normalised = [moments.sums[k] / max(float(moments.tokens[k]), 1.0) for k in keys]
    found = ops.subspace_update(normalised, rule)
    by_key = dict(zip(keys, found))
    return {name: by_key[key] for name, key in moments.groups.items()}


def retain_bases(
    moments: SecondMoments, rule: ops.SubspaceRule | str | float = ops.DEFAULT_RULE
) -> dict[str, torch.Tensor]:
    """``{module name: U}`` with ``U`` of shape ``(in, k)``; see :func:`retain_subspaces`."""
    return {name: s.basis for name, s in retain_subspaces(moments, rule).items()}


def set_retain_bases(model: nn.Module, bases: Mapping[str, torch.Tensor]) -> None:
    """Give each named adapter its retain basis (and project its ``lora_A`` off it)."""
    adapters = nsru_modules(model)
    unknown = [n for n in bases if n not in adapters]
    if unknown:
        raise KeyError(f"no NSRU adapter named {unknown[0]!r} in {type(model).__name__} ({len(unknown)} unknown names)")
    for name, basis in bases.items():
        adapters[name].set_retain_basis(basis)


def _leakage_sums(
    model: nn.Module,
    data: Mapping[str, Iterable[Mapping]],
    sets: Mapping[str, Sequence[str]],
    *,
    progress: bool,
    desc: str,
) -> dict[str, dict[str, float]]:
    """Per entry of ``sets`` (a name and the names of the ``data`` it covers) and per module, the
    mean over the non-pad tokens of all its data of ``‖P⊥h‖² / ‖h‖²``, in one hooked pass that
    forwards each batch of ``data`` once however many sets read it (data no set names is not run)."""
    adapters: dict[str, NSRULinear] = nsru_modules(model)
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no NSRU adapters; call nsru.apply_nsru() first")
    unknown = [d for names in sets.values() for d in names if d not in data]
    if unknown:
        raise KeyError(f"leakage: no data named {unknown[0]!r} (data: {', '.join(map(repr, data))})")
    totals = {key: {n: 0.0 for n in adapters} for key in sets}
    counts = {key: {n: 0 for n in adapters} for key in sets}
    current: dict = {"mask": None, "keys": ()}

    def hook(name: str, adapter: NSRULinear):
        def pre_hook(module, args):
            h = args[0].detach().reshape(-1, adapter.in_features).float()
            mask = _row_mask(args[0], current["mask"])
            if mask is not None:
                h = h[mask.to(torch.bool)]
            if h.shape[0] == 0:
                return
            u = adapter.retain_basis
            energy = h.pow(2).sum(-1).clamp_min(1e-30)
            # ‖P⊥h‖² = ‖h‖² − ‖Uᵀh‖² (U orthonormal): one product with U, no in-wide copy of h
            inside = (h @ u).pow(2).sum(-1) if u.shape[1] else torch.zeros_like(energy)
            ratio = (1.0 - inside / energy).clamp_(0.0, 1.0)
            value = float(ratio.sum())
            for key in current["keys"]:
                totals[key][name] += value
                counts[key][name] += h.shape[0]

        return pre_hook

    readers = {d: tuple(key for key, names in sets.items() if d in names) for d in data}
    runs = [(d, batches) for d, batches in data.items() if readers[d]]
    sizes = [len(b) if hasattr(b, "__len__") else None for _, b in runs]

    def tagged():
        for d, batches in runs:
            for batch in batches:
                current["keys"] = readers[d]
                yield batch

    def before_forward(batch: Mapping) -> None:
        current["mask"] = batch.get("attention_mask")

    hooks = {m: hook(n, m) for n, m in adapters.items()}
    _run_hooked(model, tagged(), hooks, desc, progress, before_forward,
                total=sum(sizes) if None not in sizes else None)
    return {key: {n: totals[key][n] / counts[key][n] if counts[key][n] else float("nan") for n in adapters}
            for key in sets}


def leakage(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    progress: bool = True,
    desc: str = "leakage",
) -> dict[str, float]:
    """Per module, the mean over non-pad tokens of ``‖P⊥h‖² / ‖h‖²`` for its inputs ``h``.

    It bounds how far the adapter can move the module's outputs on this data (``‖ΔW h‖ ≤ ‖ΔW‖‖P⊥h‖``):
    0 means the data lies in the retain subspace.
    """
    return _leakage_sums(model, {"data": batches}, {"leakage": ["data"]}, progress=progress, desc=desc)["leakage"]


def _mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    all_reduce_mean_([t])
    return dict(zip(keys, t.tolist()))


def basis_info(
    model: nn.Module,
    leakage_batches: Mapping[str, Iterable[Mapping]],
    *,
    sets: Mapping[str, Sequence[str]] | None = None,
    capped: Mapping[str, bool] | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Per adapter: its retain-subspace size ``k``, ``in_features``, whether the rule's floor
    capped ``k``, and the :func:`leakage` on each data set, averaged over the processes.

    ``leakage_batches`` names the data (e.g. ``{"leakage": statistics batches, "leakage_forget":
    forget batches}``); each batch is forwarded once, in one pass. ``sets``: the reported keys, each
    the names of the data it covers (its leakage is the mean over all their tokens, e.g.
    ``{"leakage": ["retain", "self"], "leakage_retain": ["retain"]}``); default one key per data
    name. ``progress``: one bar for the pass."""
    sets = {key: [key] for key in leakage_batches} if sets is None else sets
    sums = _leakage_sums(model, leakage_batches, sets, progress=progress, desc="leakage")
    measured = {key: _mean_over_processes(values) for key, values in sums.items()}
    capped = capped or {}
    return {name: {"k": adapter.k, "in_features": adapter.in_features, "capped": bool(capped.get(name, False)),
                   **{key: values[name] for key, values in measured.items()}}
            for name, adapter in nsru_modules(model).items()}


def summarize_bases(modules: Mapping[str, dict]) -> dict:
    """``modules_count``, ``mean_k`` and ``mean_leakage`` (of ``"leakage"``; ``None`` where no
    module has one) of a :func:`basis_info` result."""
    ks = [m["k"] for m in modules.values()]
    leaks = [m["leakage"] for m in modules.values() if m.get("leakage") is not None]
    return {"modules_count": len(modules), "mean_k": sum(ks) / len(ks) if ks else 0.0,
            "mean_leakage": sum(leaks) / len(leaks) if leaks else None}


# --------------------------------------------------------------------------------------------
# the bases file

BASES_FORMAT = "nsru-subspace"
BASES_FILE = "bases.safetensors"
MOMENTS_FILE = "moments.safetensors"
BASES_META = "subspace.json"
BASES_REPORT = "basis_report.json"


class BasesFileError(ValueError):
    """A folder that is not a readable bases file."""


@dataclass
class SavedBases:
    """A bases folder as :func:`read_bases` found it: ``meta`` (``subspace.json``), ``bases``
    (module name -> U, every module of a group holding the group's tensor) and ``report``
    (``basis_report.json``, empty where there is none)."""

    meta: dict
    bases: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)
    folder: Path | None = None


def save_bases(folder: str | os.PathLike, model: nn.Module, moments: SecondMoments, meta: Mapping,
               report: Mapping) -> None:
    """Write the retain bases the adapters of ``model`` hold, the ``moments`` they came from,
    ``meta`` (format, modules and groups are added) and ``report`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    adapters = nsru_modules(model)
    # One tensor per group: q/k/v (and gate/up) read the same input and share one basis.
    bases = {key: adapters[key].retain_basis.detach().cpu().contiguous() for key in set(moments.groups.values())}
    sums = {}
    for key in moments.sums:
        sums[f"{key}.sum"] = moments.sums[key].detach().cpu().contiguous()
        sums[f"{key}.tokens"] = moments.tokens[key].detach().cpu().reshape(1).contiguous()
    meta = {"format": BASES_FORMAT, "version": 1, **meta, "modules": list(adapters), "groups": dict(moments.groups)}
    atomic_write(folder / BASES_FILE, lambda p: save_file(bases, str(p), metadata={"format": "pt"}))
    atomic_write(folder / MOMENTS_FILE, lambda p: save_file(sums, str(p), metadata={"format": "pt"}))
    _write_json(folder / BASES_META, meta)
    _write_json(folder / BASES_REPORT, dict(report))


def _write_json(path: Path, data) -> None:
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_bases(folder: str | os.PathLike) -> SavedBases:
    """The bases folder written by :func:`save_bases` (``nsru subspace``), checked, not applied;
    :class:`BasesFileError` names what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / BASES_META
    if not meta_file.is_file() or not (folder / BASES_FILE).is_file():
        raise BasesFileError(f"{folder}: not a folder written by `nsru subspace` (no {BASES_META} / {BASES_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
        report = json.loads((folder / BASES_REPORT).read_text()) if (folder / BASES_REPORT).is_file() else {}
    except json.JSONDecodeError as e:
        raise BasesFileError(f"{meta_file}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if meta.get("format") != BASES_FORMAT:
        raise BasesFileError(f"{meta_file}: not an nsru subspace file (format {meta.get('format')!r})")
    try:
        tensors = load_file(str(folder / BASES_FILE))
    except (SafetensorError, OSError) as e:
        raise BasesFileError(f"{folder / BASES_FILE}: cannot read ({e})") from None
    groups = meta.get("groups", {})
    missing = [n for n in meta["modules"] if groups.get(n, n) not in tensors]
    if missing:
        raise BasesFileError(f"{folder / BASES_FILE}: no basis for module {missing[0]!r}")
    return SavedBases(meta, {n: tensors[groups.get(n, n)] for n in meta["modules"]}, report, folder)
