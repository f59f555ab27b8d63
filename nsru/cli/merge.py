"""``nsru merge``: write the model with its adapter merged in, as a plain transformers model.

``W ← W + (alpha / r) · B · Ã`` in every adapted module, then the plain layers are put back and the
model and its tokenizer are saved with ``save_pretrained``: the folder loads with
``AutoModelForCausalLM.from_pretrained`` and no nsru installed, at no inference cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from nsru.cli.common import (UsageError, adapter_folder, add_model_args, check_dtype_device, check_model_path,
                             load_model, writable_dir)

NAME = "merge"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="merge an adapter into the model and save a plain transformers model",
                       description=__doc__.split("\n\n", 1)[1].replace("``", ""),
                       usage="nsru merge --model PATH --adapter DIR --out DIR [--dtype D] [--device D]")
    add_model_args(p)
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="an NSRU adapter folder, a run folder of `nsru unlearn`, or a PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model (must be empty or new)")
    p.set_defaults(device=None)
    return p


def run(args, overrides: dict) -> int:
    if overrides:
        raise UsageError(f"nsru merge takes no key=value options (got {', '.join(overrides)})")
    model = check_model_path(args.model)
    check_dtype_device(args.dtype, args.device)
    folder, kind = adapter_folder(args.adapter)
    out = Path(args.out)
    writable_dir(out, keep=False)  # checked now, made once the adapter fits the model
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty; merge into a new folder")

    lm, tok = load_model(model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device or "cpu",
                         trust_remote_code=bool(args.trust_remote_code))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm, count = _merge(lm, folder, kind)
    for w in caught:  # one line each, like the command's errors
        print(f"nsru merge: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    print(f"merged {count} adapted modules")
    writable_dir(out)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "nsru_merge.json").write_text(json.dumps({"base_model": model, "adapter": str(folder), "format": kind},
                                                    indent=1) + "\n")
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it without nsru)")
    return 0


def _merge(lm, folder: Path, kind: str):
    """``(merged model, adapted modules)``; an adapter that does not fit the model is a ``UsageError``
    naming its first mismatched module (before PEFT or NSRU changes anything)."""
    import nsru
    from nsru.adapt import check_peft_adapter

    try:
        if kind == "peft":
            import peft

            check_peft_adapter(lm, folder)
            wrapped = peft.PeftModel.from_pretrained(lm, str(folder))
            count = sum(1 for n, _ in wrapped.named_modules() if n.endswith(".lora_A"))
            return wrapped.merge_and_unload(), count
        layers = nsru.load_adapter(lm, folder)
    except ValueError as e:
        raise UsageError(str(e)) from None
    nsru.merge_and_unload(lm)
    return lm, len(layers)
