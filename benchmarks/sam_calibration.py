"""How large a ``sam_rho`` stands for a relearning step? (the scale behind ``nsru/sharpness.py``)

On SmolLM2-135M-Instruct before unlearning, with NSRU adapters on the scenario's layers (20-29):
the per-token NLL of 16 forget answers (the rows the move is computed on), of the other forget
answers (held out) and of 16 retain answers, with every adapted base weight moved by ``rho`` along
the sign of the forget answers' log-likelihood gradient (what ``sam_rho`` does with the
suppression term), beside the same NLLs after the audit's relearning attacks (AdamW on every
linear weight of those layers, :func:`nsru.audit.relearned_copy`) and how far those moved the
weights (Frobenius norm).

    python benchmarks/sam_calibration.py --out benchmarks/results/sam_calibration_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RHOS = (1e-5, 2e-5, 1e-4, 3e-4, 1e-3, 3e-3)
ATTACKS = {"weak": (20, 5e-5), "strong": (20, 2e-4), "strong, 5 steps": (5, 2e-4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file of the measurements")
    args = p.parse_args(argv)

    import nsru
    from nsru.audit import relearned_copy
    from nsru.bench import real
    from nsru.data import QACollator, encode_qa
    from nsru.sharpness import WeightAscent

    torch.manual_seed(0)
    model, tok = real.load_smollm2()
    sc = real.build_scenario(model, tok, real.load_facts())
    adapters = nsru.apply_nsru(model, layers=real.LAYERS)
    collate = QACollator(tok)
    rows = {"forget": sc.forget[:16], "held_out": sc.forget[16:], "retain": sc.retain[:16]}
    batches = {k: collate([encode_qa(tok, r["question"], r["answer"], 128) for r in v]) for k, v in rows.items()}

    @torch.no_grad()
    def nll(m) -> dict[str, float]:
        return {k: round(float(m(**b).loss), 4) for k, b in batches.items()}

    ascent = WeightAscent(adapters.values())
    with ascent.gathering():
        (-model(**batches["forget"]).loss).backward()  # the direction that brings the answers back
    result = {"rows": {k: len(v) for k, v in rows.items()}, "layers": real.LAYERS, "before": nll(model),
              "moved": [], "attacks": []}
    for rho in RHOS:
        with ascent.moved(rho):
            result["moved"].append({"rho": rho, "nll": nll(model)})
        print(result["moved"][-1], flush=True)
    base = {n: p for n, p in model.named_parameters() if n.endswith(".base_layer.weight")}
    for name, (steps, lr) in ATTACKS.items():
        twin = relearned_copy(model, tok, rows["forget"], steps, lr, layers=real.LAYERS)
        moved = {n.replace(".weight", ".base_layer.weight"): p for n, p in twin.named_parameters()}
        distance = sum(float((moved[n] - p).pow(2).sum()) for n, p in base.items()) ** 0.5
        result["attacks"].append({"attack": name, "steps": steps, "lr": lr, "distance": round(distance, 3),
                                  "nll": nll(twin)})
        print(result["attacks"][-1], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
