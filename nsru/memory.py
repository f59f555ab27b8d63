"""Memory per GPU, on paper: what NSRU needs for a model given only its config, beside PEFT LoRA and
full fine-tuning, with and without FSDP; and a meter of live tensor memory that checks it on the CPU.

    shape = ModelShape.from_config(AutoConfig.from_pretrained(path))   # or PRESETS["llama-3-8b"]
    est = estimate_memory(shape, "nsru", batch=4, seq=512, world=8, fsdp=True)
    est.peak, est.setup, est.train, est.parts                          # bytes

What is counted (bytes; ``w`` weight bytes, 2 for bf16; ``a`` activation bytes, 2 for bf16):

* weights: ``P·w``; with FSDP ``P·w/N`` plus what is gathered at once: the root unit (embeddings,
  head, final norm; FSDP2 keeps the root unsharded through a step) and two blocks (the one running
  and the one prefetched).
* statistics (NSRU's set-up): one fp32 ``in × in`` second moment per group of modules reading the
  same input (q/k/v, gate/up, o, down), ×2 while the bases are computed (``retain_subspaces``
  normalises a copy), plus the eigensolver's float64 workspace, plus the statistics forward (no
  gradients, no key/value cache; it stops at the input of the last adapted module, so it holds no
  logits).
* bases: one fp32 ``in × k`` basis per group, ``k = basis_fraction · in`` (the energy rule decides
  ``k``; the tiny benchmark model keeps 0.43 of the width at τ = 0.9, so 0.5 is the planning value).
* adapters: ``r · (in + out)`` fp32 per module, with gradient and AdamW's two moments: 16 bytes each.
* activations, per token of each forward whose graph is held at once (one: the trainer runs each
  loss term's backward before the next term's forward; NSRU's three terms summed first hold three): per
  block ``a·(7h + 4f + kv) + 4·(2h + heads + 2)`` — the inputs each adapter saves (norm outputs,
  attention output, MLP product), SDPA's q, k, v (repeated to all heads; grouped-query models keep
  the unrepeated k, v too), its output and log-sum-exp, SwiGLU's gate/up/product, and the fp32
  inputs the RMSNorms save — plus the logits (``a`` each) and their fp32 log-softmax (4 each),
  plus a 4-D float attention mask (``batch · seq²``). Backward adds one forward's logit gradients.
  Measured on the CPU (fp32, SDPA) within 4 % per block (see ``tests/test_memory.py``).
* PEFT LoRA: the same weights, adapters and activations, no statistics or bases.
* full fine-tuning: 16 bytes per parameter (bf16 weights and gradients, fp32 master weights and
  AdamW moments, as ZeRO counts it) plus a frozen bf16 reference copy (NPO and KL need π_ref;
  adapters get it for free by switching themselves off); with FSDP all of it divided by N.

Not counted: the CUDA context and allocator slack (~1–2 GiB a GPU), and that ``nsru.unlearn``
currently keeps the statistics alive through training (``setup`` shows their size).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nsru.ops.subspace_update import EIGH_BATCH_BYTES
from nsru.subspace import FLUSH_BYTES

GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (what memory depends on)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @classmethod
    def from_config(cls, config, name: str | None = None) -> ModelShape:
        """From a transformers config (or its ``config.json`` as a dict)."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            name=name or str(get("_name_or_path", None) or get("model_type", "model")),
            vocab=int(get("vocab_size")),
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads", None) or heads),
            head_dim=int(get("head_dim", None) or hidden // heads),
            tied=bool(get("tie_word_embeddings", False)),
        )

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, in, out)`` of the linear modules of one block."""
        h, f, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)]

    def input_groups(self) -> list[int]:
        """Input widths of one block's statistics groups (modules reading one tensor share one)."""
        return [self.hidden, self.heads * self.head_dim, self.hidden, self.intermediate]

    def block_params(self) -> int:
        return sum(i * o for _, i, o in self.linears()) + 2 * self.hidden

    def root_params(self) -> int:
        """Embeddings, final norm and head: what is outside the blocks."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.block_params() + self.root_params()


PRESETS = {
    "llama-2-7b": ModelShape("Llama-2-7B", vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32,
                             kv_heads=32, head_dim=128),
    "llama-3-8b": ModelShape("Llama-3-8B", vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32,
                             kv_heads=8, head_dim=128),
    "llama-3-70b": ModelShape("Llama-3-70B", vocab=128256, hidden=8192, intermediate=28672, layers=80, heads=64,
                              kv_heads=8, head_dim=128),
}

METHODS = ("nsru", "lora", "full")


@dataclass
class MemoryEstimate:
    """Bytes per GPU: ``parts`` by what holds them, ``setup`` (NSRU's statistics phase) and
    ``train`` (the peak of a training step); ``peak`` is the larger."""

    shape: ModelShape
    method: str
    world: int
    fsdp: bool
    parts: dict[str, int] = field(default_factory=dict)
    setup: int = 0
    train: int = 0

    @property
    def peak(self) -> int:
        return max(self.setup, self.train)

    def gib(self) -> dict[str, float]:
        return {k: v / GiB for k, v in {**self.parts, "setup": self.setup, "train": self.train,
                                        "peak": self.peak}.items()}


def activation_bytes(shape: ModelShape, tokens: int, act_bytes: int = 2, seq: int | None = None) -> dict[str, int]:
    """Saved activations of one forward with gradients over ``tokens`` tokens (``seq``: the
    padded length, for the attention mask): ``blocks``, ``logits`` and ``other``."""
    h, f, heads = shape.hidden, shape.intermediate, shape.heads
    q, kv = heads * shape.head_dim, shape.kv_heads * shape.head_dim
    kv_saved = 2 * q + (2 * kv if kv < q else 0)
    per_block = act_bytes * (h + q + kv_saved + q + q + h + 4 * f) + 4 * (2 * h + heads + 2)
    mask = tokens * (seq or 0) * act_bytes
    return {"blocks": shape.layers * per_block * tokens,
            "logits": shape.vocab * (act_bytes + 4) * tokens,
            "other": 4 * h * tokens + mask}


def estimate_memory(
    shape: ModelShape,
    method: str = "nsru",
    *,
    batch: int = 4,
    seq: int = 512,
    world: int = 1,
    fsdp: bool = False,
    r: int = 8,
    basis_fraction: float = 0.5,
    forwards: int = 1,
    weight_bytes: int = 2,
    act_bytes: int = 2,
    stats_chunk: int = 16,
    adapted_layers: int | None = None,
) -> MemoryEstimate:
    """Memory per GPU of ``method`` (``nsru``, ``lora`` = PEFT LoRA, ``full`` = full fine-tuning)
    on ``shape`` with ``batch`` sequences of ``seq`` tokens per GPU and per forward, ``forwards``
    forwards whose graphs are held at once (1: the trainer runs each loss term's backward before the
    next term's forward; 3 for a loop that sums NSRU's terms first), ``world`` GPUs, all linear modules of
    every block adapted with rank ``r`` (or of ``adapted_layers`` blocks: the ``layers`` option). See
    the module docstring for what each part counts."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if fsdp and world < 2:
        raise ValueError("fsdp needs world >= 2")
    n = world if fsdp else 1
    P, L = shape.params(), shape.layers if adapted_layers is None else adapted_layers
    gathered = (shape.root_params() + 2 * shape.block_params()) * weight_bytes if fsdp else 0
    parts: dict[str, int] = {}
    if method == "full":
        parts["weights"] = P * weight_bytes // n + gathered
        parts["gradients+optimizer"] = P * (16 - weight_bytes) // n + (2 * shape.block_params() * 2 if fsdp else 0)
        parts["reference"] = P * weight_bytes // n
    else:
        parts["weights"] = P * weight_bytes // n + gathered
        adapter_params = L * r * sum(i + o for _, i, o in shape.linears())
        parts["adapters+optimizer"] = 16 * adapter_params
    if method == "nsru":
        widths = shape.input_groups()
        parts["statistics"] = L * sum(4 * w * w for w in widths)
        parts["bases"] = L * sum(4 * w * int(basis_fraction * w) for w in widths)
    tokens = batch * seq
    act = activation_bytes(shape, tokens, act_bytes, seq)
    # Each forward keeps its blocks' activations and its fp32 log-softmax; the loss holds one
    # forward's logits as well (NSRU's safe-target term).
    parts["activations"] = forwards * (act["blocks"] + act["other"] + 4 * shape.vocab * tokens) + (
        act_bytes * shape.vocab * tokens)
    backward = act["logits"] + 2 * act_bytes * shape.intermediate * tokens  # one forward's logit gradients
    est = MemoryEstimate(shape, method, world, fsdp, parts)
    est.train = sum(v for k, v in parts.items() if k != "statistics") + backward
    if method == "nsru":
        est.setup = parts["weights"] + parts["adapters+optimizer"] + parts["statistics"] + max(
            _collect_transient(shape, L, stats_chunk * seq, act_bytes),
            parts["statistics"] + _eigh_workspace(shape, parts["statistics"]))
    return est


def _collect_transient(shape: ModelShape, layers: int, tokens: int, act_bytes: int) -> int:
    """The statistics forward: module inputs held until ``second_moment_`` flushes them (at
    ``nsru.subspace.FLUSH_BYTES`` or the end of the forward). The forward stops at the input of the
    last adapted module (``nsru.subspace._run_hooked``): no logits."""
    inputs = tokens * layers * sum(shape.input_groups()) * act_bytes
    return min(inputs, FLUSH_BYTES + tokens * shape.intermediate * act_bytes)


def _eigh_workspace(shape: ModelShape, statistics: int) -> int:
    """float64 copies, eigenvectors and LAPACK's syevd workspace of one batch of eigensolves
    (batches hold at most ``EIGH_BATCH_BYTES`` of float64 statistics, or one matrix that is larger)."""
    widest = max(shape.input_groups())
    return max(int(1.5 * min(EIGH_BATCH_BYTES, 2 * statistics)), 4 * 8 * widest * widest)


def memory_table(models: Iterable[str] = ("llama-2-7b", "llama-3-8b", "llama-3-70b"), *, batch: int = 4,
                 seq: int = 256, world: int = 8, **kwargs) -> str:
    """A markdown table of :func:`estimate_memory` (GiB per GPU) for the ``PRESETS`` named."""
    lines = [f"| model | GPUs | NSRU set-up | NSRU training | PEFT LoRA | full fine-tuning | "
             f"statistics | bases | activations |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in models:
        shape = PRESETS[key]
        for n, fsdp in ((1, False), (world, True)):
            nsru, lora, full = (estimate_memory(shape, m, batch=batch, seq=seq, world=n, fsdp=fsdp, **kwargs)
                                for m in METHODS)
            g = nsru.gib()
            lines.append(
                f"| {shape.name} | {n}{' (FSDP)' if fsdp else ''} | {g['setup']:.1f} | {g['train']:.1f} | "
                f"{lora.train / GiB:.1f} | {full.train / GiB:.1f} | {g['statistics']:.1f} | {g['bases']:.1f} | "
                f"{g['activations']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# measuring


class TensorMemory(TorchDispatchMode):
    """Live bytes of tensor storage while it is active, and their peak: every tensor an operator
    returns is counted until it is freed, on top of ``existing`` (tensors alive before, e.g. the
    weights). For the CPU, which has no ``torch.cuda.max_memory_allocated``; it sees what the
    operators allocate, not allocator slack or memory held outside tensors.

        with TensorMemory(model.parameters()) as mem:
            loss = model(**batch).loss; loss.backward()
        mem.peak
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        for t in existing:
            self._count(t, track=False)
        self.now = self.base = sum(self._live.values())
        self.peak = self.now

    def _count(self, t: torch.Tensor, track: bool = True) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        if track:
            self.now += self._live[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._count(t)
        return out


if __name__ == "__main__":  # python -m nsru.memory: the README's table
    print(memory_table())
