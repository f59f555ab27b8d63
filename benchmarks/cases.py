"""What the benchmark suites compare: the layers, the retain-statistics model and the two training
steps, built the same way on the CPU and on CUDA. Shapes follow Llama-7B (hidden 4096, MLP 11008)
scaled to the machine: a quarter of the width and 2048 tokens on the CPU, full size on a GPU.

``NSRU_BENCH_SMOKE=1`` shrinks every shape so that the whole suite runs in seconds (it checks the
plumbing, not the speed).
"""

from __future__ import annotations

import copy
import ctypes
import os
import time
from collections.abc import Callable

import torch
from torch import nn

SMOKE = os.environ.get("NSRU_BENCH_SMOKE", "0") == "1"

# Llama-7B projections: (in, out) of the attention projections, the MLP's up/gate and its down.
LLAMA_7B = {"attn": (4096, 4096), "mlp-up": (4096, 11008), "mlp-down": (11008, 4096)}
R, ALPHA = 16, 32  # the adapters' r and alpha


def layer_shape(name: str, device: str) -> dict:
    """M, K, N of one projection: Llama-7B's on CUDA (8192 tokens, bf16), a quarter of its width
    and 2048 tokens on the CPU (fp32), tiny under NSRU_BENCH_SMOKE."""
    k, n = LLAMA_7B[name]
    if SMOKE:
        return {"tokens": 64, "in_features": k // 64, "out_features": n // 64, "dtype": torch.float32}
    if device == "cuda":
        return {"tokens": 8192, "in_features": k, "out_features": n, "dtype": torch.bfloat16}
    return {"tokens": 2048, "in_features": k // 4, "out_features": n // 4, "dtype": torch.float32}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced(fn: Callable, device: str) -> Callable:
    """``fn`` followed by a CUDA synchronisation, so that a wall-clock timer sees the kernels' time."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


# ------------------------------------------------------------------------------------ layers


def copy_linear(linear: nn.Linear) -> nn.Linear:
    """A frozen copy of ``linear`` on its device, in its dtype."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
    out.load_state_dict(linear.state_dict())
    return out.requires_grad_(False)


def peft_lora(linear: nn.Linear, r: int = R, alpha: int = ALPHA) -> nn.Module:
    """PEFT's ``lora.Linear`` around ``linear`` as users get it from ``get_peft_model`` (adapters
    in fp32), with a non-zero B so that its cost is a trained layer's."""
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.proj = linear
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0.0, 0.02)
    return lora


def has_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def build_layers(shape: dict, device: str, bias: bool = False, seed: int = 0) -> dict[str, nn.Module]:
    """``nn.Linear`` (frozen: the floor), ``NSRULinear`` (retain basis of K/2 columns, a trained-looking
    B) and PEFT LoRA (when ``peft`` is installed), all three around the *same* frozen projection, so
    that each reads the weight from the same memory as the baseline timed before it. Llama's
    projections have no bias."""
    import nsru

    torch.manual_seed(seed)
    k, n = shape["in_features"], shape["out_features"]
    linear = nn.Linear(k, n, bias=bias, device=device, dtype=shape["dtype"]).requires_grad_(False)
    layer = nsru.NSRULinear.from_linear(linear, r=R, alpha=ALPHA)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
    layer.set_retain_basis(torch.linalg.qr(torch.randn(k, k // 2, device=device))[0])
    layers = {"nn.Linear": linear, "NSRULinear": layer}
    if has_peft():
        layers["PEFT LoRA"] = peft_lora(linear)
    return layers


def layer_inputs(shape: dict, device: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape["tokens"], shape["in_features"], generator=g, device=device).to(shape["dtype"])
    dy = torch.randn(shape["tokens"], shape["out_features"], generator=g, device=device).to(shape["dtype"])
    return x, dy / shape["out_features"] ** 0.5


def forward_step(module: nn.Module, x: torch.Tensor) -> Callable:
    """A callable running ``module`` on ``x`` without autograd."""

    def step():
        with torch.no_grad():
            return module(x)

    return step


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable:
    """A callable running forward and backward of ``module`` (dX always computed, as inside a
    network), with the gradients cleared first so that no accumulation is timed."""
    xg = x.detach().clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        xg.grad = None
        for p in params:
            p.grad = None
        module(xg).backward(dy)

    return step


# ------------------------------------------------------------------------- second moments

SECOND_MOMENT_CASES = {  # widths of the modules of one grouped call
    "8x1024": [1024] * 8,
    "4x2048": [2048] * 4,
    "llama-layer": [1024, 1024, 1024, 2752],  # the distinct inputs of one layer at a quarter of 7B
}


def second_moment_inputs(widths: list[int], dtype: torch.dtype, device: str, tokens: int | None = None, seed: int = 0):
    if SMOKE:
        widths, tokens = [max(8, d // 32) for d in widths], 64
    elif tokens is None:
        tokens = 8192 if device == "cuda" else 2048
    if device == "cuda" and not SMOKE:
        widths = [4 * d if d != 2752 else 11008 for d in widths]  # Llama-7B widths on a GPU
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = [torch.randn(tokens, d, generator=g, device=device).to(dtype) for d in widths]
    moments = [torch.zeros(d, d, device=device) for d in widths]
    return moments, inputs


def second_moment_loop(moments, inputs) -> None:
    """What a user would write: one ``addmm_`` per module, the input converted to the moment's dtype."""
    for c, x in zip(moments, inputs):
        x = x.to(c.dtype)
        c.addmm_(x.T, x)


def project_rows_case(device: str, layers: int | None = None, seed: int = 0):
    """``lora_A`` gradients and retain bases of every projection of ``layers`` Llama layers
    (r = 16; k = in / 2): what the trainer projects after each step."""
    shape_of = {name: layer_shape(name, device) for name in LLAMA_7B}
    per_layer = ["attn"] * 4 + ["mlp-up"] * 2 + ["mlp-down"]  # q k v o, gate up, down
    layers = layers or (8 if device == "cuda" else 4)
    g = torch.Generator(device=device).manual_seed(seed)
    grads, bases = [], []
    for _ in range(layers):
        for name in per_layer:
            width = shape_of[name]["in_features"]
            grads.append(torch.randn(R, width, generator=g, device=device))
            bases.append(torch.linalg.qr(torch.randn(width, width // 2, generator=g, device=device))[0])
    return grads, bases


# --------------------------------------------------------------------------- small Llamas


def llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, seq: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def statistics_config(device: str) -> dict:
    """A Llama with 7B's proportions (MLP = 2.69 x hidden) scaled down; batches of padded sequences."""
    if SMOKE:
        return {"hidden": 32, "intermediate": 86, "layers": 2, "heads": 4, "vocab": 128, "batch": 2, "seq": 32, "batches": 2}
    if device == "cuda":
        return {"hidden": 2048, "intermediate": 5504, "layers": 4, "heads": 16, "vocab": 8192, "batch": 8, "seq": 1024, "batches": 4}
    return {"hidden": 512, "intermediate": 1376, "layers": 4, "heads": 8, "vocab": 2048, "batch": 4, "seq": 256, "batches": 2}


def token_batches(c: dict, device: str, seed: int = 1) -> list[dict]:
    """``c["batches"]`` batches of right-padded random sequences (lengths from half to full)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(c["batches"]):
        ids = torch.randint(4, c["vocab"], (c["batch"], c["seq"]), generator=g)
        lengths = torch.randint(c["seq"] // 2, c["seq"] + 1, (c["batch"],), generator=g)
        mask = (torch.arange(c["seq"]) < lengths[:, None]).long()
        out.append({"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)})
    return out


def statistics_model(device: str):
    """A Llama (bf16 on CUDA, fp32 on the CPU) with NSRU adapters on every projection, and its batches."""
    import nsru

    c = statistics_config(device)
    model = llama(c["hidden"], c["intermediate"], c["layers"], c["heads"], c["vocab"], c["seq"])
    model = model.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    nsru.apply_nsru(model, "all-linear", r=8)
    return model, token_batches(c, device), c


# ------------------------------------------------------------------------ training steps


def training_config(device: str) -> dict:
    if SMOKE:
        return {"hidden": 32, "intermediate": 86, "layers": 2, "heads": 4, "vocab": 128, "batch": 2, "prompt": 6, "answer": 6}
    if device == "cuda":
        return {"hidden": 2048, "intermediate": 5504, "layers": 8, "heads": 16, "vocab": 32000, "batch": 8, "prompt": 64, "answer": 192}
    return {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 4, "vocab": 2048, "batch": 8, "prompt": 16, "answer": 48}


def _qa(g: torch.Generator, c: dict) -> dict:
    """One question-answer encoding of random tokens (labels on the answer), as ``nsru.data.encode_qa`` makes."""
    n_q = int(torch.randint(c["prompt"] // 2, c["prompt"] + 1, (1,), generator=g))
    n_a = int(torch.randint(c["answer"] // 2, c["answer"] + 1, (1,), generator=g))
    q = torch.randint(4, c["vocab"], (n_q,), generator=g).tolist()
    a = torch.randint(4, c["vocab"], (n_a,), generator=g).tolist()
    return {"input_ids": q + a, "attention_mask": [1] * (n_q + n_a), "labels": [-100] * n_q + a}


def unlearning_data(c: dict, n: int = 64, seed: int = 2) -> tuple[list[dict], list[dict]]:
    """Forget examples (original answer and a safe target for the same question) and retain examples."""
    g = torch.Generator().manual_seed(seed)
    forget = []
    for _ in range(n):
        ex = _qa(g, c)
        safe = _qa(g, c)
        n_q = ex["labels"].count(-100)
        safe_answer = [t for t in safe["labels"] if t != -100]
        prompt = ex["input_ids"][:n_q]
        forget.append({
            "forget": ex,
            "safe": {"input_ids": prompt + safe_answer, "attention_mask": [1] * (n_q + len(safe_answer)),
                     "labels": [-100] * n_q + safe_answer},
        })  # fmt: skip
    retain = [{"retain": _qa(g, c)} for _ in range(n)]
    return forget, retain


def _trainer(model, method: str, params: dict, adapters: dict, forget, retain, c: dict, device: str):
    from nsru.methods import LossContext
    from nsru.sampler import Stream
    from nsru.train import Trainer
    from nsru.pipeline import resolve_config

    options = {"batch_size": c["batch"], "steps": 10**6, "lr": 1e-3, "progress": False, "device": device}
    cfg, m = resolve_config(method, None, options)
    streams = {
        "forget": Stream(forget, cfg.batch_size, seed=0, salt=1),
        "retain": Stream(retain, cfg.batch_size, seed=0, salt=2),
    }
    for p in params.values():
        p.requires_grad_(True)
    return Trainer(model, cfg, m, LossContext(model, cfg), streams, params, adapters=adapters)


def training_steps(device: str) -> dict[str, Callable]:
    """One optimizer step of each, on copies of one random Llama and the same batches:

    * ``NSRU``: ``nsru.unlearn``'s machinery — NSRU adapters on every projection with retain bases
      from ``collect_second_moments`` on the retain data, the ``nsru`` method (safe-target CE, NPO
      with the reference pass through the disabled adapters, NLL retention), ``nsru.train.Trainer``'s
      step (AdamW, clipping, re-projection of ``lora_A``);
    * ``PEFT LoRA GradDiff``: PEFT LoRA (same r, alpha and modules) through ``get_peft_model``, the
      ``graddiff`` method (gradient ascent on the forget answers + NLL retention), the same Trainer.
    """
    import nsru
    from peft import LoraConfig, get_peft_model

    c = training_config(device)
    base = llama(c["hidden"], c["intermediate"], c["layers"], c["heads"], c["vocab"], c["prompt"] + c["answer"])
    base = base.to(device).requires_grad_(False)
    forget, retain = unlearning_data(c)

    model = copy.deepcopy(base)
    adapters = nsru.apply_nsru(model, "all-linear", r=8, alpha=16)
    from nsru.data import pad_encodings

    stat_batches = [
        {k: v.to(device) for k, v in pad_encodings([r["retain"] for r in retain[i:i + 16]], 0).items() if k != "labels"}
        for i in range(0, len(retain), 16)
    ]
    moments = nsru.collect_second_moments(model, stat_batches, progress=False)
    nsru.set_retain_bases(model, nsru.retain_bases(moments, "energy=0.9"))
    params = {f"{n}.{p}": getattr(layer, p) for n, layer in adapters.items() for p in ("lora_A", "lora_B")}
    nsru_trainer = _trainer(model, "nsru", params, adapters, forget, retain, c, device)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    lora_params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    peft_forget = [{"forget": ex["forget"]} for ex in forget]
    peft_trainer = _trainer(peft_model, "graddiff", lora_params, {}, peft_forget, retain, c, device)
    return {"NSRU": nsru_trainer.train_step, "PEFT LoRA GradDiff": peft_trainer.train_step}


# --------------------------------------------------------------------------- peak memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


def _heap_bytes_fn() -> Callable[[], int] | None:
    """Bytes the C heap has handed out now (glibc ``mallinfo2``: arena chunks in use + mmapped
    chunks), which is where CPU tensors live; ``None`` where glibc is not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def used() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return used


def peak_memory(fn: Callable, device: str) -> int | None:
    """Bytes by which one call of ``fn`` raises memory in use at its peak, over what was in use before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the C heap in use (glibc ``mallinfo2``), which
    is where CPU tensors live, independent of what the allocator keeps cached (unlike the resident
    set); sampled before and after every aten operator by a dispatch mode (every intermediate
    tensor while it is alive) and every 0.2 ms by a thread (buffers inside one operator).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    used = _heap_bytes_fn()
    if used is None:
        return None
    import threading

    from torch.utils._python_dispatch import TorchDispatchMode

    peak = [used()]
    before = peak[0]
    done = threading.Event()

    def poll():
        while not done.wait(0.0002):
            peak[0] = max(peak[0], used())

    class Sample(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            peak[0] = max(peak[0], used())
            out = func(*args, **(kwargs or {}))
            peak[0] = max(peak[0], used())
            return out

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        with Sample():
            fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], used()) - before


def wall(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------ whole unlearning runs


def unlearn_config(device: str, quick: bool = False) -> dict:
    """One whole run's model and budget. ``quick`` (``--benchmark-disable``, ``NSRU_BENCH_SMOKE``):
    seconds, to check the plumbing; else a 256-wide Llama on the CPU (a 1024-wide one on CUDA)."""
    if quick or SMOKE:
        return {"hidden": 64, "intermediate": 172, "layers": 2, "heads": 4, "forget": 8, "retain": 16, "steps": 2,
                "batch": 4, "self_samples": 4, "self_tokens": 8}
    if device == "cuda":
        return {"hidden": 1024, "intermediate": 2752, "layers": 8, "heads": 16, "forget": 64, "retain": 256,
                "steps": 30, "batch": 16, "self_samples": 128, "self_tokens": 64}
    return {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 4, "forget": 32, "retain": 96, "steps": 20,
            "batch": 8, "self_samples": 32, "self_tokens": 32}


_WORLD: dict = {}


def world_data(c: dict) -> tuple[object, list[dict], list[dict]]:
    """The offline benchmark's tokenizer (byte-level BPE trained on its world, 1024 tokens) and
    ``c["forget"]`` / ``c["retain"]`` of its generated question-answer rows (TOFU's fields)."""
    from nsru.bench.models import build_tokenizer
    from nsru.bench.world import make_world

    if "tokenizer" not in _WORLD:
        world = make_world()
        _WORLD.update(tokenizer=build_tokenizer(world), forget=world.split("forget05"), retain=world.split("retain95"))
    return _WORLD["tokenizer"], _WORLD["forget"][:c["forget"]], _WORLD["retain"][:c["retain"]]


def unlearn_options(c: dict, device: str) -> dict:
    """``nsru.unlearn``'s options of every run: the defaults but the budget (steps, batch, self-samples)."""
    return {"steps": c["steps"], "batch_size": c["batch"], "self_samples": c["self_samples"],
            "self_max_new_tokens": c["self_tokens"], "max_length": 128, "progress": False, "device": device}


class PhaseTimes:
    """Time spent in the pipeline's phases, by wrapping the functions that do them wherever the
    ``nsru`` modules hold them (``from x import f`` copies a name, so every copy is wrapped) and
    the Trainer's ``train`` and ``save_checkpoint``. Times are exclusive: a phase inside another
    (the final checkpoint inside training) counts for itself only. ``other`` in :meth:`shares` is
    what no phase covers (tokenising, adding adapters, the reference copy...). A function a later
    version no longer has is skipped, and its time lands in ``other``."""

    PHASES = (  # (phase, module, attribute)
        ("self-samples", "nsru.self_samples", "sample_self"),
        ("statistics", "nsru.stats_sources", "global_source_means"),
        ("statistics", "nsru.subspace", "collect_second_moments"),
        ("bases", "nsru.subspace", "retain_subspaces"),
        ("bases", "nsru.subspace", "set_retain_bases"),
        ("leakage", "nsru.subspace", "basis_info"),
        ("leakage", "nsru.subspace", "leakage"),
        ("init", "nsru.adapter_init", "init_adapters"),
    )
    METHODS = (("training", "train"), ("saving", "save_checkpoint"))

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        self.seconds: dict[str, float] = {}
        self.trainers: list = []  # the Trainer of each run (its train_step can be timed afterwards)
        self._stack: list[list[float]] = []  # [start, time of the phases inside]

    def _wrap(self, phase: str, fn: Callable, keep_self: bool = False) -> Callable:
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if keep_self:
                self.trainers.append(args[0])
            self._stack.append([self.timer(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, inner = self._stack.pop()
                spent = self.timer() - start
                self.seconds[phase] = self.seconds.get(phase, 0.0) + spent - inner
                if self._stack:
                    self._stack[-1][1] += spent

        return timed

    def __enter__(self) -> PhaseTimes:
        import importlib
        import sys

        import nsru
        import nsru.train

        # the pipeline's module first, so that it imports the functions before they are wrapped
        importlib.import_module(nsru.unlearn.__module__)
        self._undo: list[tuple[object, str, object]] = []
        for phase, module, name in self.PHASES:
            try:
                fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
            timed = self._wrap(phase, fn)
            for mod in [m for n, m in list(sys.modules.items()) if n == "nsru" or n.startswith("nsru.")]:
                for attr, value in list(vars(mod).items()):
                    if value is fn or getattr(value, "__wrapped__", None) is fn:  # (a copy left wrapped)
                        self._undo.append((mod, attr, fn))
                        setattr(mod, attr, timed)
        for phase, name in self.METHODS:
            fn = getattr(nsru.train.Trainer, name)
            self._undo.append((nsru.train.Trainer, name, fn))
            setattr(nsru.train.Trainer, name, self._wrap(phase, fn, keep_self=name == "train"))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, value in reversed(self._undo):
            setattr(owner, attr, value)

    def shares(self, total: float) -> dict[str, float]:
        """Each phase's fraction of ``total``, and ``other``."""
        out = {k: v / total for k, v in self.seconds.items()}
        out["other"] = max(0.0, 1.0 - sum(out.values()))
        return out


def fresh_cache_run(fn: Callable, *args, **kwargs):
    """``fn(*args, output_dir=..., **kwargs)`` with an empty ``NSRU_CACHE`` and a fresh output
    folder, both removed afterwards: a first run, which writes its self-samples rather than reading
    them from an earlier one's cache, and writes its checkpoint."""
    import tempfile

    before = os.environ.get("NSRU_CACHE")
    with tempfile.TemporaryDirectory(prefix="nsru-bench-") as tmp:
        os.environ["NSRU_CACHE"] = os.path.join(tmp, "cache")
        try:
            return fn(*args, output_dir=os.path.join(tmp, "run"), **kwargs)
        finally:
            if before is None:
                os.environ.pop("NSRU_CACHE", None)
            else:
                os.environ["NSRU_CACHE"] = before


def peft_unlearn(base: nn.Module, tokenizer, forget_rows: list[dict], retain_rows: list[dict], method: str,
                 options: dict, *, output_dir: str | None = None, r: int = 8, alpha: float = 16.0) -> nn.Module:
    """A baseline run as a PEFT user would write it around NSRU's trainer: tokenise the rows as
    ``nsru.unlearn`` does, ``get_peft_model`` LoRA (same r, alpha, ``all-linear``) on a copy of
    ``base``, ``method``'s loss (the reference policy, where it needs one, is the model with PEFT's
    adapters disabled) in the same ``Trainer`` for the same steps, then its checkpoint and PEFT's
    adapter files in ``output_dir``."""
    from contextlib import contextmanager
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from nsru.data import encode_qa, pad_token_id
    from nsru.methods import LossContext
    from nsru.pipeline import resolve_config
    from nsru.sampler import Stream
    from nsru.train import Trainer

    class PeftContext(LossContext):
        @contextmanager
        def _reference(self):
            with self.model.disable_adapter():
                yield self.model

    options = {**{k: v for k, v in options.items() if not k.startswith("self_")}, "output_dir": output_dir}
    cfg, m = resolve_config(method, None, options)
    pad = pad_token_id(tokenizer)
    enc = lambda rows: [encode_qa(tokenizer, r["question"], r["answer"], max_length=cfg.max_length) for r in rows]  # noqa: E731
    forget = [{"forget": e} for e in enc(forget_rows)]
    retain = [{"retain": e} for e in enc(retain_rows)]
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                           target_modules="all-linear"))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    streams = {"forget": Stream(forget, cfg.batch_size, seed=cfg.seed, salt=1, pad_id=pad),
               "retain": Stream(retain, cfg.batch_size, seed=cfg.seed, salt=2, pad_id=pad)}
    trainer = Trainer(model, cfg, m, PeftContext(model, cfg), streams, params)
    trainer.train()
    if output_dir is not None:
        model.save_pretrained(Path(output_dir) / "adapter")
    return model
