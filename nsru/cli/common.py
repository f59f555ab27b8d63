"""What the commands share: the configuration (YAML + ``key=value``), model and data loading, errors.

Everything here that runs before a model is loaded imports neither torch nor transformers, so a bad
option is rejected in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from nsru.config import HELP, ConfigError, UnlearnConfig, read_yaml_mapping


class UsageError(Exception):
    """An input the command cannot use; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# configuration

# The ``run:`` section of a config file: what to unlearn from what (the command-line flags win).
RUN_KEYS = {
    "model": "model folder or hub name",
    "tokenizer": "tokenizer folder or hub name (default: the model's)",
    "forget": "forget data: TOFU-style JSON/JSONL, a text corpus, or a datasets name",
    "retain": "retain data (same formats)",
    "target": "names to forget whose forget rows the model writes itself (a list)",
    "dtype": "auto, float32, bfloat16 or float16",
    "device": "cpu, cuda, cuda:N or auto",
    "trust_remote_code": "let transformers run the model's own code",
    "bases": "folder written by `nsru subspace` whose retain bases to reuse",
}
SECTIONS = ("run", "unlearn")
LIST_OPTIONS = ("target_modules", "stats")  # a comma-separated value is a list (not a regex / a file name)
NAME_LIST_OPTIONS = ("stats_avoid",)  # always a list of names: one name, or several separated by commas
CLI_OWNED = {"output_dir": "--out", "resume": "--resume"}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "target_modules=[q_proj,v_proj]"]`` -> values typed by YAML (then by the
    option's type: ``1e-3`` is a float); a token without ``=`` is an error."""
    import yaml

    hints = _hints()
    out: dict[str, Any] = {}
    for token in tokens:
        key, eq, raw = token.partition("=")
        key = key.strip()
        if not eq or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"unrecognized argument {token!r}: options are --flags or key=value (e.g. lr=3e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        hint = hints.get(key, "")
        if isinstance(value, (int, float, bool)) and "str" in hint and not any(
                t in hint for t in ("int", "float", "bool", "Any")):
            value = raw  # a string option whose text YAML read as a number (e.g. device=0)
        if isinstance(value, (dict, list)) and "Any" not in hint and "tuple" not in hint:
            value = raw
        listed = key in LIST_OPTIONS and "," in str(value) and not re.search(r"[\\^$*+?()\[\]{}|]", str(value))
        if isinstance(value, str) and (listed or key in NAME_LIST_OPTIONS):
            value = [part.strip() for part in value.split(",") if part.strip()]  # q_proj,v_proj; "Ada Lovelace"
        out[key] = value
    return out


def _hints() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(UnlearnConfig)}


def read_config_file(path: str | os.PathLike | None) -> tuple[dict, dict]:
    """``(run, unlearn)`` sections of a YAML config; a file without sections is all ``unlearn``."""
    if path is None:
        return {}, {}
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {file}: no such file")
    try:
        data = read_yaml_mapping(file)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if not any(k in SECTIONS for k in data):
        return {}, data
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise UsageError(f"{file}: unknown section {unknown[0]!r}; a config has the sections {', '.join(SECTIONS)}")
    run, unlearn = data.get("run") or {}, data.get("unlearn") or {}
    for name, section in (("run", run), ("unlearn", unlearn)):
        if not isinstance(section, dict):
            raise UsageError(f"{file}: section {name!r} must be a mapping, got {type(section).__name__}")
    for key in run:
        if key not in RUN_KEYS:
            raise UsageError(f"{file}: unknown key {key!r} in section 'run'{_suggest(key, RUN_KEYS)} "
                             f"(keys: {', '.join(RUN_KEYS)})")
    return run, unlearn


def _suggest(key: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def build_config(file_values: dict, overrides: dict, where: str = "") -> UnlearnConfig:
    """One validated :class:`UnlearnConfig` from a file's values and ``key=value`` overrides (these win)."""
    for key in overrides:
        if key in CLI_OWNED:
            raise UsageError(f"{key} is set by {CLI_OWNED[key]}, not as key=value")
    for key in file_values:
        if key in CLI_OWNED:
            raise UsageError(f"{where}: {key} is set by {CLI_OWNED[key]}; remove it from the config file")
    for key in overrides:
        if key in RUN_KEYS and key not in HELP:
            raise UsageError(f"{key}= is a flag of the command: use --{key.replace('_', '-')} {overrides[key]}")
    try:
        cfg = UnlearnConfig.from_dict({**file_values, **overrides})
    except ConfigError as e:
        raise UsageError(f"{where + ': ' if where and not overrides else ''}{e}") from None
    except TypeError as e:  # a value of a type no check expected (e.g. a mapping)
        raise UsageError(f"invalid option value: {e}") from None
    try:
        from nsru.methods import get_method

        get_method(cfg.method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


def wrap(text: str, width: int = 100) -> str:
    """Paragraphs filled to ``width`` for a raw-text help (lines that start with spaces stay as they are)."""
    import textwrap

    out = []
    for block in text.split("\n"):
        out.append(block if block.startswith(" ") or not block else textwrap.fill(block, width))
    return "\n".join(out)


def options_help(names=None) -> str:
    """The ``key=value`` options with their defaults, for a command's ``--help`` (all but those the
    command line sets itself, or only ``names``)."""
    lines = []
    for f in dataclasses.fields(UnlearnConfig):
        if (names is not None and f.name not in names) or (names is None and f.name in CLI_OWNED):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        import textwrap

        text = textwrap.fill(HELP.get(f.name, ""), 96, initial_indent="      ", subsequent_indent="      ")
        lines.append(f"  {f.name}={shown}\n{text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# arguments shared by several commands


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=False, metavar="PATH",
                   help="a transformers causal LM: local folder (save_pretrained), hub name, or a GGUF file "
                        "(dequantised once into the cache: $NSRU_CACHE, default ~/.cache/nsru)" +
                        (" (required here or in the config's run section)" if required else ""))
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer folder, hub name or GGUF file (default: the model's)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' dtype (default: auto, as saved; adapters always train in float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto, cuda when present)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="let transformers run code shipped with the model")


def check_model_path(model: str | None, flag: str = "--model") -> str:
    """The model folder, GGUF file or hub name, checked without loading anything."""
    if not model:
        raise UsageError(f"{flag} is required (a model folder, a .gguf file or a hub name)")
    path = Path(model).expanduser()
    if path.is_file():
        import importlib.util

        from nsru.gguf import is_gguf

        if not is_gguf(path):
            raise UsageError(f"{flag} {model}: a file but not a GGUF one (it does not start with 'GGUF'); expected "
                             "a model folder written by save_pretrained or a .gguf file")
        if importlib.util.find_spec("gguf") is None:
            raise UsageError(f"{flag} {model}: reading a GGUF file needs the gguf package: pip install gguf")
        return str(path.resolve())
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {model}: neither a folder nor a file; expected a model folder or a .gguf file")
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {model}: no config.json in this folder; expected a folder written by "
                             "save_pretrained")
        return str(path.resolve())
    if path.suffix.lower() == ".gguf":
        raise UsageError(f"{flag} {model}: no such file")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise UsageError(f"{flag} {model}: no such folder (and not a hub name such as org/model)")
    return model


def check_dtype_device(dtype: str | None, device: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", str(device)):
        raise UsageError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")


def load_model(model: str, *, tokenizer: str | None = None, dtype: str | None = None, device: str | None = None,
               trust_remote_code: bool = False, log=print):
    """``(model, tokenizer)`` in eval mode on ``device``; a GGUF file (model or tokenizer) is read from
    its float32 safetensors copy in the cache, made on first use (``dtype`` applies as for a folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsru.gguf import gguf_folder, is_gguf

    def converted(name: str) -> str:  # a GGUF file: the cache folder of its plain copy
        return str(gguf_folder(name, log=log)) if is_gguf(name) else name

    device = device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but torch sees no CUDA device")
    torch_dtype = "auto" if dtype in (None, "auto") else getattr(torch, dtype)
    log(f"loading {model} ({dtype or 'auto'}) on {device}")
    try:
        model_path = converted(model)
        tokenizer_path = converted(tokenizer) if tokenizer else model_path
        tok = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load {model!r}: {first}") from None
    lm.to(device).eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return lm, tok


# --------------------------------------------------------------------------------------------
# data


def _hub_spec(spec: str) -> tuple[str, str | None, str | None] | None:
    """``NAME[:CONFIG][@SPLIT]`` -> parts, for a name that is not a local path."""
    m = re.fullmatch(r"([\w.-]+/[\w.-]+|[\w.-]+)(?::([\w.+-]+))?(?:@([\w.\[\]:%+-]+))?", spec)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def data_source(spec: str, flag: str):
    """A local file (returned as a path) or a ``datasets`` dataset for ``NAME[:CONFIG][@SPLIT]``,
    e.g. ``locuslab/TOFU:forget10`` (split ``train`` when the dataset has several)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        import datasets

        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):  # save_to_disk
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
        return _one_split(loaded, spec, None, flag)
    parts = _hub_spec(spec)
    if parts is None or spec.startswith((".", "/", "~")) or path.suffix.lower() in (".json", ".jsonl", ".txt"):
        raise UsageError(f"{flag} {spec}: no such file (expected a JSON/JSONL file or a datasets name such as "
                         "locuslab/TOFU:forget10)")
    name, config, split = parts
    import datasets

    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many kinds (connection, not found, bad config)
        first = " ".join(str(e).split())[:300]
        raise UsageError(f"{flag} {spec}: not a local file, and the datasets hub could not load it: {first}") from None
    return _one_split(loaded, spec, split, flag)


def _one_split(loaded, spec: str, split: str | None, flag: str):
    if type(loaded).__name__ in ("DatasetDict", "IterableDatasetDict"):
        splits = list(loaded.keys())
        if split is None and len(splits) == 1:
            return loaded[splits[0]]
        if split is None and "train" in splits:
            return loaded["train"]
        raise UsageError(f"{flag} {spec}: choose a split with @SPLIT (it has {', '.join(splits)})")
    return loaded


def load_rows(spec: str | None, flag: str):
    """Question-answer or text rows, read and checked now (a bad row fails before any model loads)."""
    if spec is None:
        return None
    from nsru.data import DataError, load_rows as _load

    try:
        return _load(data_source(spec, flag), flag.lstrip("-"))
    except DataError as e:
        raise UsageError(str(e)) from None


def load_mc(spec: str, flag: str) -> list[dict]:
    """WMDP-style multiple-choice rows: ``question``, ``choices`` (a list) and ``answer`` (its index)."""
    from nsru.data import DataError, records

    try:
        found = records(data_source(spec, flag))
    except DataError as e:
        raise UsageError(str(e)) from None
    rows = []
    for loc, row in found:
        if not isinstance(row, dict):
            raise UsageError(f"{loc}: expected an object with question, choices and answer")
        missing = [k for k in ("question", "choices", "answer") if k not in row]
        if missing:
            raise UsageError(f"{loc}: missing field {missing[0]!r} (a multiple-choice row has question, choices, "
                             "answer = the index of the right choice)")
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UsageError(f"{loc}: 'choices' must be a list of at least two strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise UsageError(f"{loc}: 'answer' must be the index of the right choice (0-{len(choices) - 1}), "
                             f"got {answer!r}")
        rows.append(dict(row))
    if not rows:
        raise UsageError(f"{flag} {spec}: no rows")
    return rows


def named_files(values: list[str] | None, flag: str) -> dict[str, str]:
    """``["world=facts.json", "x.json"]`` -> ``{"world": "facts.json", "x": "x.json"}``."""
    out = {}
    for value in values or []:
        name, eq, spec = value.partition("=")
        if not eq:
            name, spec = Path(value).stem, value
        if not name or not spec:
            raise UsageError(f"{flag} {value!r}: expected NAME=FILE or FILE")
        out[name] = spec
    return out


# --------------------------------------------------------------------------------------------
# output folders


def writable_dir(path: str | os.PathLike, flag: str = "--out", keep: bool = True) -> Path:
    """Create ``path`` (and its parents) and check a file can be written in it. ``keep=False`` only
    checks: the folders it made are removed again, so input rejected later leaves nothing behind."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {path} is a file; expected a folder")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"{flag} {path}: {above} is a file; expected a folder")
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nsru-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to {flag} {path}: {e.strerror or e}") from None
    finally:
        while made and not keep:  # deepest first
            try:
                made.pop(0).rmdir()
            except OSError:
                break
    return out


def adapter_folder(path: str, flag: str = "--adapter") -> tuple[Path, str]:
    """``(folder, format)`` of an adapter given as its folder or as a run folder holding ``adapter/``;
    format is ``nsru`` or ``peft``."""
    import json

    folder = Path(path).expanduser()
    if (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise UsageError(f"{flag} {path}: no adapter_config.json there (expected an adapter folder or a run folder "
                         "of `nsru unlearn`)")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{config}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if data.get("peft_type") is not None:
        return folder, "peft"
    if data.get("format") == "nsru-adapter":
        return folder, "nsru"
    raise UsageError(f"{config}: neither an NSRU adapter nor a PEFT one")
