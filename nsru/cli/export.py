"""``nsru export``: an NSRU adapter as a PEFT LoRA adapter.

After training, ``Ã = A − (A U) Uᵀ`` is an ordinary LoRA ``A``: the export writes
``adapter_model.safetensors`` (``lora_A = Ã``, ``lora_B = B``) and ``adapter_config.json`` (a
``LoraConfig``: r, lora_alpha, target_modules, per-module ranks in rank_pattern), which
``peft.PeftModel.from_pretrained(base_model, DIR)`` loads and LoRA-serving engines accept. No model
is loaded: the files alone hold what the conversion needs.
"""

from __future__ import annotations

import argparse

from nsru.cli.common import UsageError, adapter_folder, writable_dir

NAME = "export"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="convert an NSRU adapter to PEFT's LoRA format",
                       description=__doc__.split("\n\n", 1)[1].replace("``", ""),
                       usage="nsru export --adapter DIR --out DIR [--base-model NAME]")
    p.add_argument("--adapter", required=True, metavar="DIR", help="an NSRU adapter folder or a run folder of "
                                                                   "`nsru unlearn`")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PEFT adapter")
    p.add_argument("--base-model", metavar="NAME", help="base_model_name_or_path to record (default: the model the "
                                                        "adapter was trained on)")
    p.add_argument("--format", choices=("peft",), default="peft", help="output format (peft)")
    return p


def run(args, overrides: dict) -> int:
    if overrides:
        raise UsageError(f"nsru export takes no key=value options (got {', '.join(overrides)})")
    folder, kind = adapter_folder(args.adapter)
    if kind == "peft":
        raise UsageError(f"--adapter {args.adapter}: already a PEFT adapter")
    out = writable_dir(args.out, keep=False)  # made by the export, once the adapter has read whole
    if (out / "adapter_model.safetensors").exists():
        raise UsageError(f"--out {out} already holds a PEFT adapter; choose another --out")
    from nsru.adapt import export_peft

    try:
        export_peft(folder, out, base_model_name_or_path=args.base_model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}/adapter_model.safetensors and adapter_config.json "
          f"(peft.PeftModel.from_pretrained(model, {str(out)!r}))")
    return 0
