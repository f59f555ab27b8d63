"""One full NSRU training step vs a PEFT-LoRA GradDiff step: the number a user feels.

Both on copies of one small random ``LlamaForCausalLM`` (256 wide, 4 layers, fp32 on the CPU;
2048 wide, 8 layers, bf16 autocast on CUDA), adapters with r = 8 on every projection, batches of 8
question-answer pairs from the same data, one ``nsru.train.Trainer`` step each (AdamW, clipping):

* ``NSRU``: ``nsru.unlearn``'s pieces — retain bases from ``collect_second_moments``, the
  ``nsru`` method (safe-target CE, NPO with a reference pass through the disabled adapters, NLL
  retention: three policy forwards and one reference forward), projection of the ``lora_A``
  gradients, re-projection after the step;
* ``PEFT LoRA GradDiff`` (baseline): ``peft.get_peft_model`` LoRA, the ``graddiff`` method
  (gradient ascent on the forget answers + NLL retention: two policy forwards).

Issue 11's target: NSRU <= 1.0x the GradDiff step at no more peak memory. Peak memory is measured
on one more step after the timing (``cases.peak_memory``).

The unlearning wall time per method on the real-model scenario is not timed here (a run takes
many minutes): ``benchmarks/report.py`` reads it from ``nsru/bench/real.py``'s results.

    pytest benchmarks/bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import pytest

import cases

_cache: dict = {}


def _steps(device: str):
    if device not in _cache:
        _cache.clear()
        _cache[device] = cases.training_steps(device)
    return _cache[device]


@pytest.mark.parametrize("impl", ["PEFT LoRA GradDiff", "NSRU"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_train_step(paired, device, impl):
    if not cases.has_peft():
        pytest.skip("peft is not installed (the baseline is a PEFT-LoRA step)")
    steps = {name: cases.synced(fn, device) for name, fn in _steps(device).items()}
    c = cases.training_config(device)
    paired(
        steps[impl], steps["PEFT LoRA GradDiff"],
        group=f"training step {device} (Llama h{c['hidden']} x{c['layers']}, batch {c['batch']}, r=8)",
        label=impl, baseline_label="PEFT LoRA GradDiff", target=1.0 if impl == "NSRU" else None,
        memory_device=device,
    )  # fmt: skip
