"""Put ``NSRULinear`` into a model, take it out again, and save or load the adapters.

``target_modules`` follows PEFT: a list of names, each matching a module whose full name equals
it or ends with ``"." + name``; a string, matched as a regular expression against the full name
(``re.fullmatch``); or ``"all-linear"``, every linear module except the output head.

Adapters are saved in NSRU's own format (``adapter.safetensors``: ``lora_A``, ``lora_B`` and the
retain basis of every module, so training can continue) or in PEFT's LoRA format
(``adapter_model.safetensors`` + ``adapter_config.json``), which ``peft.PeftModel.from_pretrained``
and LoRA-serving engines load: after training the projected factor ``Ã = A − (A U) Uᵀ`` is an
ordinary LoRA ``A``, so ``ΔW = (alpha / r) · B · Ã`` is exactly PEFT's update.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nsru.atomic import atomic_write
from nsru.layer import NSRULinear, is_linear, nsru_modules

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "nsru-adapter"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
SAVE_FORMATS = ("nsru", "peft")
_FINGERPRINT_VALUES = 4096  # leading values of each base parameter that the fingerprint reads

TargetModules = str | Sequence[str]


def _linear_names(model: nn.Module) -> list[str]:
    skip = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if isinstance(m, NSRULinear):
            skip.add(name + ".base_layer")
        if head is not None and m is head:
            skip.add(name)
    return [name for name, m in model.named_modules() if name and is_linear(m) and name not in skip]


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def layer_index(name: str) -> int | None:
    """The block a module belongs to: the first whole-number part of its name (``model.layers.3.mlp``)."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def parse_layers(layers: str | Sequence[int] | None) -> list[int] | None:
    """``"10-19"`` (inclusive), ``"3,5,7"`` or a list of ints as a sorted list; ``None`` stays ``None``."""
    if layers is None:
        return None
    try:
        if isinstance(layers, str):
            found: set[int] = set()
            for part in filter(None, (p.strip() for p in layers.split(","))):
                lo, dash, hi = part.partition("-")
                found.update(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        else:
            found = {int(i) for i in layers}
    except (TypeError, ValueError):
        raise ValueError(f"layers must look like '10-19', '3,5,7' or a list of layer indices, got {layers!r}") from None
    if not found or min(found) < 0:
        raise ValueError(f"layers must name at least one layer index >= 0, got {layers!r}")
    return sorted(found)


def find_target_modules(
    model: nn.Module, target_modules: TargetModules = "all-linear", layers: str | Sequence[int] | None = None
) -> list[str]:
    """Full names of the linear modules that ``target_modules`` selects, within ``layers`` (block
    indices; all when ``None``); raises if there are none."""
    candidates = _linear_names(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        names = candidates
    else:
        names = [n for n in candidates if _matches(n, target_modules)]
    wanted = parse_layers(layers)
    if wanted is not None:
        present = sorted({i for i in map(layer_index, names) if i is not None})
        names = [n for n in names if layer_index(n) in wanted]
        if not names:
            raise ValueError(f"layers={layers!r} selects none of the matched modules; their layers are "
                             f"{present[0]}-{present[-1]}" if present else f"layers={layers!r}: the matched "
                             "modules have no layer index in their names")
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        example = f" (e.g. {candidates[0]!r})" if candidates else ""
        raise ValueError(
            f"target_modules={target_modules!r} matched no linear module of {type(model).__name__}. "
            f"Its linear modules end in: {', '.join(suffixes) or 'none'}{example}. Pass names like "
            f"{suffixes[:2] or ['q_proj']}, a regex matched against full names, or 'all-linear'."
        )
    return names


def check_targets(
    model: nn.Module, target_modules: TargetModules = "all-linear", r: int | dict[str, int] = 8,
    layers: str | Sequence[int] | None = None
) -> list[str]:
    """What :func:`apply_nsru` would adapt, checked without changing ``model``: the modules must
    exist and each must be wide enough for its ``r``. Raises ``ValueError`` naming the first problem."""
    names = find_target_modules(model, target_modules, layers)
    for name in names:
        r_here = r[name] if isinstance(r, dict) else r
        in_f, out_f, _ = _shape_of(model.get_submodule(name))
        if isinstance(r_here, bool) or not isinstance(r_here, int) or r_here < 1:
            raise ValueError(f"r (the adapter's inner dimension) must be a positive integer, got {r_here!r} for "
                             f"module {name!r}")
        if r_here > min(in_f, out_f):
            raise ValueError(f"r={r_here} is larger than module {name!r} allows: it maps {in_f} -> {out_f} features, "
                             f"so r can be at most {min(in_f, out_f)}")
    return names


def check_bases(model: nn.Module, bases: Mapping[str, torch.Tensor], r: int | dict[str, int] = 8) -> list[str]:
    """What :func:`apply_nsru` on the modules of ``bases`` (module name -> retain basis U, in × k)
    would adapt, checked without changing ``model``: :func:`check_targets`, and every basis has as
    many rows as its module reads features."""
    names = check_targets(model, list(bases), r)
    odd = sorted(set(names) ^ set(bases))  # a name of no module, or one that also ends another module's name
    if odd:
        raise ValueError(f"the bases do not name linear modules of {type(model).__name__} one to one (e.g. {odd[0]!r}): "
                         "the bases are of another model, or their names are not full module names")
    for name in bases:
        in_f = _shape_of(model.get_submodule(name))[0]
        if bases[name].dim() != 2 or bases[name].shape[0] != in_f:
            raise ValueError(f"the basis of {name!r} has shape {tuple(bases[name].shape)} but the module reads {in_f} "
                             f"features (expected ({in_f}, k)): the bases are of another model")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_nsru(
    model: nn.Module,
    target_modules: TargetModules = "all-linear",
    r: int | dict[str, int] = 8,
    alpha: float | dict[str, float] = 16.0,
    layers: str | Sequence[int] | None = None,
) -> dict[str, NSRULinear]:
    """Replace the selected linear modules of ``model`` (within ``layers``, block indices such as
    ``"10-19"``; all when ``None``) by ``NSRULinear``, in place.

    Every parameter of ``model`` is frozen; only the adapters' ``lora_A``/``lora_B`` train.
    ``r`` (the adapters' inner dimension) and ``alpha`` may be dicts from module name to value
    (a choice per module). Returns the new adapters by name.
    """
    existing = nsru_modules(model)
    if existing:
        raise ValueError(
            f"{type(model).__name__} already has {len(existing)} NSRU adapters (e.g. {next(iter(existing))!r}); "
            "call merge_and_unload() first or load_adapter() to replace their weights"
        )
    names = check_targets(model, target_modules, r, layers)  # all checked before the first module is replaced
    model.requires_grad_(False)
    adapted = {}
    for name in names:
        r_here = r[name] if isinstance(r, dict) else r
        a = alpha[name] if isinstance(alpha, dict) else alpha
        adapter = NSRULinear(model.get_submodule(name), r=r_here, alpha=a, name=name)
        _set_submodule(model, name, adapter)
        adapted[name] = adapter
    return adapted


def merge_adapters(model: nn.Module) -> None:
    for adapter in nsru_modules(model).values():
        adapter.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for adapter in nsru_modules(model).values():
        adapter.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base layers back; returns ``model``."""
    for name, adapter in nsru_modules(model).items():
        adapter.merge()
        _set_submodule(model, name, adapter.base_layer)
    return model


def base_fingerprint(model: nn.Module) -> str | None:
    """A short hash of the base weights (names, shapes and the leading values of every parameter
    but the adapters'), the same with or without unmerged adapters in the model and for a float32
    or bfloat16 copy of the weights (values are hashed at bfloat16 precision). ``None`` where the
    base weights cannot be read as they are: an adapter is merged into them, or they are sharded."""
    adapters = nsru_modules(model)
    if any(adapter.merged for adapter in adapters.values()):
        return None
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            if type(p.data) is not torch.Tensor:  # a DTensor shard (FSDP): not the whole weight
                return None
            h.update(f"{name.replace('.base_layer.', '.')}{tuple(p.shape)}".encode())
            head = p.detach().reshape(-1)[:_FINGERPRINT_VALUES].to(torch.bfloat16).float().cpu()
            h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


def _check_fingerprint(folder: Path, config: dict, model: nn.Module) -> None:
    """Warn when the adapter was trained on other base weights than ``model``'s (same shapes,
    another model: the adapter loads, but what it does there is not what was trained)."""
    trained = config.get("base_fingerprint")
    if not trained:
        return
    here = base_fingerprint(model)
    if here is not None and here != trained:
        warnings.warn(f"{folder}: the adapter was trained on base weights with fingerprint {trained} (of "
                      f"{config.get('base_model_name_or_path') or 'an unnamed model'}), but this model's weights have "
                      f"fingerprint {here}: another model or other weights, which the adapter was not trained for",
                      stacklevel=3)


def save_adapter(model: nn.Module, path: str | os.PathLike, format: str = "nsru",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters to the folder ``path``.

    ``format="nsru"`` (default): ``adapter.safetensors`` (lora_A, lora_B, retain_basis per module)
    and ``adapter_config.json``; :func:`load_adapter` reads them back and training can continue.
    ``format="peft"``: PEFT's LoRA files (``adapter_model.safetensors`` with ``lora_A = Ã`` and
    ``lora_B = B``, and a ``LoraConfig``), for ``peft.PeftModel.from_pretrained(base, path)``.
    ``base_model_name_or_path`` (default: the model config's ``_name_or_path``) is recorded in both;
    the NSRU format also records :func:`base_fingerprint`, which :func:`load_adapter` compares.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SAVE_FORMATS)}, got {format!r}")
    adapters = nsru_modules(model)
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no NSRU adapters to save; call apply_nsru() first")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if format == "peft":
        from nsru.ops import null_space_factor

        with torch.no_grad():
            entries = {
                name: _PeftEntry(null_space_factor(adapter.lora_A.detach(), adapter.retain_basis).cpu(),
                                 adapter.lora_B.detach().cpu(), adapter.r, adapter.alpha,
                                 not isinstance(adapter.base_layer, nn.Linear))
                for name, adapter in adapters.items()
            }
        return _write_peft(out, entries, base_model_name_or_path)
    tensors, modules = {}, {}
    for name, adapter in adapters.items():
        tensors[f"{name}.lora_A"] = adapter.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = adapter.lora_B.detach().cpu().contiguous()
        tensors[f"{name}.retain_basis"] = adapter.retain_basis.detach().cpu().clone()  # q/k/v share one basis in memory
        modules[name] = {
            "r": adapter.r,
            "alpha": adapter.alpha,
            "in_features": adapter.in_features,
            "out_features": adapter.out_features,
            "k": adapter.k,
        }
        if not isinstance(adapter.base_layer, nn.Linear):
            modules[name]["conv1d"] = True  # transformers' Conv1D (weight stored as in × out): PEFT's fan_in_fan_out
    config = {"format": ADAPTER_FORMAT, "version": 1, "base_model_class": type(model).__name__,
              "base_model_name_or_path": base_model_name_or_path, "base_fingerprint": base_fingerprint(model),
              "modules": modules}
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


class _PeftEntry(NamedTuple):
    a_tilde: torch.Tensor  # (r, in): the projected A
    b: torch.Tensor  # (out, r)
    r: int
    alpha: float
    conv1d: bool


def _write_peft(out: Path, entries: dict[str, _PeftEntry], base_model_name_or_path: str | None) -> Path:
    """PEFT's LoRA files for ``entries``: the most common ``r`` and alpha become ``r`` and
    ``lora_alpha``, the others go to PEFT's ``rank_pattern`` / ``alpha_pattern`` (keys: escaped full names,
    which PEFT matches as regular expressions)."""
    fan_in_fan_out = {e.conv1d for e in entries.values()}
    if len(fan_in_fan_out) > 1:
        raise ValueError("cannot write one PEFT config for a model whose adapted modules mix nn.Linear and Conv1D "
                         "(PEFT's fan_in_fan_out is one setting per adapter)")
    r = Counter(e.r for e in entries.values()).most_common(1)[0][0]
    alpha = Counter(e.alpha for e in entries.values()).most_common(1)[0][0]
    tensors = {}
    for name, e in entries.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = e.a_tilde.to(torch.float32).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = e.b.to(torch.float32).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _plain_number(alpha),
        "target_modules": sorted(entries),
        "rank_pattern": {re.escape(n): e.r for n, e in sorted(entries.items()) if e.r != r},
        "alpha_pattern": {re.escape(n): _plain_number(e.alpha) for n, e in sorted(entries.items()) if e.alpha != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / PEFT_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(adapter: str | os.PathLike, out: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Convert an adapter folder written by :func:`save_adapter` (NSRU format) into PEFT's LoRA
    format in ``out``, from the files alone (no model needed): ``lora_A = A − (A U) Uᵀ``."""
    from nsru.ops import null_space_factor

    folder = Path(adapter)
    config = _read_config(folder)
    tensors = _read_weights(folder)
    entries = {}
    for name, meta in config["modules"].items():
        missing = [k for k in ("lora_A", "lora_B", "retain_basis") if f"{name}.{k}" not in tensors]
        if missing:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: missing tensor {name}.{missing[0]!r}")
        a, b, u = (tensors[f"{name}.{k}"].to(torch.float32) for k in ("lora_A", "lora_B", "retain_basis"))
        if a.shape[1] != u.shape[0] or b.shape[1] != a.shape[0]:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: shapes of module {name!r} do not fit together: "
                             f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, retain_basis {tuple(u.shape)}")
        entries[name] = _PeftEntry(null_space_factor(a, u), b, int(meta["r"]), float(meta["alpha"]),
                                   bool(meta.get("conv1d", False)))
    if not entries:
        raise ValueError(f"{folder / ADAPTER_CONFIG}: the adapter has no modules")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return _write_peft(out, entries, base_model_name_or_path or config.get("base_model_name_or_path"))


def _read_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no adapter config at {file}; expected a folder written by nsru.save_adapter")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if config.get("peft_type") is not None:
        raise ValueError(f"{file}: a PEFT adapter (peft_type {config['peft_type']!r}), not an NSRU one; load it with "
                         "peft.PeftModel.from_pretrained(model, folder)")
    if config.get("format") != ADAPTER_FORMAT or not isinstance(config.get("modules"), dict):
        raise ValueError(f"{file}: not an NSRU adapter config (expected format {ADAPTER_FORMAT!r} and a 'modules' map)")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights_file = folder / ADAPTER_WEIGHTS
    try:
        return load_file(str(weights_file))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file}: cannot read adapter weights ({err})") from None


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, NSRULinear]:
    """Load an adapter written by :func:`save_adapter` into ``model``.

    Adapters are added first where the model has none (from the config's module list and each
    module's ``r`` and alpha). Every tensor's shape is checked against its module before anything
    is copied, so a mismatched file leaves the model as it was. An adapter trained on other base
    weights (its recorded :func:`base_fingerprint` differs from the model's) loads with a warning
    naming both.
    """
    folder = Path(path)
    config = _read_config(folder)
    tensors = _read_weights(folder)
    entries = config["modules"]
    adapters = nsru_modules(model)
    if not adapters:
        present = {n for n, _ in model.named_modules()}
        missing = [n for n in entries if n not in present]
        if missing:
            raise ValueError(f"{folder}: the model {type(model).__name__} has no module named {missing[0]!r} "
                             f"({len(missing)} of {len(entries)} adapter modules missing)")
        for name in entries:
            module = model.get_submodule(name)
            if not is_linear(module):
                raise ValueError(f"{folder}: module {name!r} of the model is {type(module).__name__}, not a linear layer")
        _check_shapes(folder, entries, tensors, {n: _shape_of(model.get_submodule(n)) for n in entries})
        adapters = apply_nsru(
            model,
            target_modules=list(entries),
            r={n: int(e["r"]) for n, e in entries.items()},
            alpha={n: float(e["alpha"]) for n, e in entries.items()},
        )
        adapters = {n: adapters[n] for n in entries}
    else:
        missing = [n for n in entries if n not in adapters]
        if missing:
            raise ValueError(f"{folder}: adapter module {missing[0]!r} has no NSRULinear in the model "
                             f"(the model's adapters: {', '.join(list(adapters)[:5])}...)")
        shapes = {n: (adapters[n].in_features, adapters[n].out_features, adapters[n].r) for n in entries}
        _check_shapes(folder, entries, tensors, shapes)
    _check_fingerprint(folder, config, model)
    with torch.no_grad():
        for name, adapter in adapters.items():
            if name not in entries:
                continue
            if adapter.merged:
                raise RuntimeError(f"module {name!r} is merged; unmerge() before loading an adapter into it")
            adapter.lora_A.copy_(tensors[f"{name}.lora_A"])
            adapter.lora_B.copy_(tensors[f"{name}.lora_B"])
            adapter.retain_basis = tensors[f"{name}.retain_basis"].to(adapter.lora_A.device, torch.float32)
    return adapters


def _shape_of(module: nn.Module) -> tuple[int, int, None]:
    w = module.weight
    out_f, in_f = w.shape if isinstance(module, nn.Linear) else (w.shape[1], w.shape[0])
    return int(in_f), int(out_f), None


def _check_shapes(folder: Path, entries: dict, tensors: dict, shapes: dict) -> None:
    for name, entry in entries.items():
        in_f, out_f, r = shapes[name]
        r = int(entry["r"]) if r is None else r
        expected = {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        for part, shape in expected.items():
            key = f"{name}.{part}"
            if key not in tensors:
                raise ValueError(f"{folder / ADAPTER_WEIGHTS}: missing tensor {key!r}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"{folder / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensors[key].shape)} but module {name!r} "
                    f"({in_f} -> {out_f}, r={r}) needs {shape}"
                )
        basis = tensors.get(f"{name}.retain_basis")
        if basis is None or basis.dim() != 2 or basis.shape[0] != in_f or basis.shape[1] > in_f:
            got = "missing" if basis is None else tuple(basis.shape)
            raise ValueError(
                f"{folder / ADAPTER_WEIGHTS}: {name}.retain_basis is {got}; module {name!r} needs ({in_f}, k), k <= {in_f}"
            )
    extra = sorted(set(tensors) - {f"{n}.{p}" for n in entries for p in ("lora_A", "lora_B", "retain_basis")})
    if extra:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: {len(extra)} tensors that {ADAPTER_CONFIG} does not list "
                         f"(e.g. {extra[0]!r}): the weights and the config are not of the same adapter")


def check_peft_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Check a PEFT LoRA adapter folder against ``model`` before PEFT loads it: every ``lora_A`` /
    ``lora_B`` weight must belong to a linear module of the model and fit its width. Raises
    ``ValueError`` naming the first module that does not, with both shapes (PEFT itself lists
    every mismatch of every module). Nothing is checked when the weights are not safetensors."""
    folder = Path(path)
    file = folder / PEFT_WEIGHTS
    if not file.is_file():
        return
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: cannot read adapter weights ({err})") from None
    prefix = "base_model.model."
    present = dict(model.named_modules())
    for key, t in sorted(tensors.items()):
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            continue
        name, part = m.group(1).removeprefix(prefix), m.group(2)
        module = present.get(name)
        if module is None or not is_linear(module):
            what = "has no module" if module is None else f"has a {type(module).__name__}, not a linear layer,"
            raise ValueError(f"{file}: the model ({type(model).__name__}) {what} named {name!r} for {key}; the "
                             "adapter is of another model")
        in_f, out_f, _ = _shape_of(module)
        shape = tuple(t.shape)
        ok = (t.dim() == 2 and shape[1] == in_f) if part == "lora_A" else (t.dim() == 2 and shape[0] == out_f)
        if not ok:
            needs = f"(r, {in_f})" if part == "lora_A" else f"({out_f}, r)"
            raise ValueError(f"{file}: {key} has shape {shape} but module {name!r} of the model maps {in_f} -> "
                             f"{out_f} features, so it needs {needs}; the adapter is of another model")
