"""The folder of one ``nsru unlearn`` run.

::

    OUT/
      config.yaml          the resolved configuration: run (model, data, ...) and unlearn (every option,
                           with the method's loss weights filled in); `--config OUT/config.yaml` repeats it
      log.txt              what the command printed, with times
      history.jsonl        one line per optimizer step: step, lr, loss terms, gradient norm
      basis_report.json    per adapted module: retain-subspace size k, width, leakage on the
                           statistics / retain / forget data; and their means
      adapter/             the NSRU adapter (nsru.load_adapter; `nsru export` makes a PEFT one)
      metrics.json         "train": time, steps, last losses; "eval": what `nsru eval --out OUT` measured
      checkpoints/         checkpoint-<step>/ folders for `--resume` (save_every=N)
      generated/           with --target: forget.jsonl, retain.jsonl (the rows the model wrote about the
                           names and their neighbours; read or edit them: a rerun or --resume reuses
                           them) and report.json (what was asked, kept and dropped, and why)

Standard library (and PyYAML) only.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from nsru.atomic import atomic_write
from nsru.cli.common import UsageError, writable_dir

CONFIG = "config.yaml"
LOG = "log.txt"
HISTORY = "history.jsonl"
BASIS_REPORT = "basis_report.json"
ADAPTER = "adapter"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
GENERATED = "generated"


class RunDir:
    """One run folder. Only its owner (``owner=True``: rank 0 under ``torchrun``) prints or writes;
    lines logged before :meth:`create` are kept and written then, so a run rejected before it
    starts leaves nothing in ``--out``."""

    def __init__(self, path: str | Path, echo: bool = True, owner: bool = True) -> None:
        self.path = Path(path)
        self.echo = echo
        self.owner = owner
        self._pending: list[str] = []
        self._made: list[Path] = []  # what create() made, for discard()
        self._created = False

    @classmethod
    def check(cls, path: str | Path, resume: bool) -> None:
        """Whether ``path`` can take the run, checked without writing anything there: with
        ``resume`` it must hold a run; else it must hold none and be (or become) a writable folder."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {path} is a file; expected a folder")
        if resume:
            if not (path / CONFIG).is_file():
                raise UsageError(f"--resume: {path} holds no run to continue (no {CONFIG}); start it without --resume")
        elif (path / CONFIG).is_file():
            raise UsageError(f"--out {path} already holds a run; pass --resume to continue it, or choose another --out")
        writable_dir(path, keep=False)

    def create(self, run: dict, unlearn: dict, resume: bool) -> None:
        """Check the folder again (another command may have taken it since), make it, write
        ``config.yaml`` and the lines logged so far. Only the owner writes."""
        if not self.owner:
            return
        self.check(self.path, resume)
        self._made = [p for p in (self.path / CONFIG, self.path / LOG, self.path / CHECKPOINTS, self.path,
                                  *self.path.parents) if not p.exists()]
        writable_dir(self.path)
        self.write_config(run, unlearn)
        self._created = True
        if self._pending:
            with open(self.path / LOG, "a", encoding="utf-8") as f:
                f.writelines(self._pending)
            self._pending = []

    def discard(self) -> list[Path]:
        """Remove what :meth:`create` made, when the run stopped before its first checkpoint: the
        folder then holds no run, and the same command can be run again without ``--resume``.
        Returns what was removed (nothing after a checkpoint, on a resumed run, or off the owner)."""
        from nsru.checkpoint import latest_checkpoint

        ckpts = self.path / CHECKPOINTS
        if (not self.owner or self.path / CONFIG not in self._made
                or (ckpts.is_dir() and latest_checkpoint(ckpts) is not None)):
            return []
        removed = []
        for p in self._made:  # files first, then the folders, deepest first
            try:
                if p == ckpts and p.is_dir():
                    shutil.rmtree(p)  # no complete checkpoint: at most half-written ones
                elif p.is_dir():
                    p.rmdir()
                elif p.exists():
                    p.unlink()
                else:
                    continue
            except OSError:
                break  # a folder that holds something else stays, and so do those above it
            removed.append(p)
        self._made = []
        return removed

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- text

    def log(self, message: str) -> None:
        """Print ``message`` and append it to ``log.txt`` with the time (kept until :meth:`create`)."""
        if not self.owner:
            return
        if self.echo:
            print(message, flush=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = [f"{stamp}  {line}\n" for line in str(message).splitlines() or [""]]
        if not self._created:
            self._pending.extend(lines)
            return
        with open(self.path / LOG, "a", encoding="utf-8") as f:
            f.writelines(lines)

    def write_json(self, name: str, data) -> Path:
        text = json.dumps(data, indent=1, default=_plain) + "\n"
        atomic_write(self.path / name, lambda p: p.write_text(text, encoding="utf-8"))
        return self.path / name

    def read_json(self, name: str, default=None):
        file = self.path / name
        if not file.is_file():
            return default
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UsageError(f"{file}: not valid JSON (line {e.lineno}): {e.msg}") from None

    # ---- configuration

    def write_config(self, run: dict, unlearn: dict) -> Path:
        import yaml

        body = {"run": {k: v for k, v in run.items() if v is not None}, "unlearn": _yaml_safe(unlearn)}
        text = ("# Resolved configuration of this run (nsru unlearn --config this-file repeats it).\n"
                + yaml.safe_dump(body, sort_keys=False, default_flow_style=None))
        atomic_write(self.path / CONFIG, lambda p: p.write_text(text, encoding="utf-8"))
        return self.path / CONFIG

    def read_config(self) -> tuple[dict, dict]:
        from nsru.cli.common import read_config_file

        return read_config_file(self.path / CONFIG)

    # ---- history and metrics

    def write_history(self, records: list[dict]) -> Path:
        text = "".join(json.dumps(r, default=_plain) + "\n" for r in records)
        atomic_write(self.path / HISTORY, lambda p: p.write_text(text, encoding="utf-8"))
        return self.path / HISTORY

    def history_from_checkpoint(self) -> list[dict]:
        """The history saved in the newest checkpoint (what is left after a failed run)."""
        from nsru.checkpoint import STATE_FILE, latest_checkpoint

        found = latest_checkpoint(self.path / CHECKPOINTS) if (self.path / CHECKPOINTS).is_dir() else None
        if found is None:
            return []
        try:
            return list(json.loads((found / STATE_FILE).read_text()).get("history", []))
        except (OSError, ValueError):
            return []

    def update_metrics(self, section: str, values: dict, drop: tuple[str, ...] = ()) -> Path:
        """Set one section of ``metrics.json``, keeping the others but those in ``drop``."""
        metrics = self.read_json(METRICS, {}) or {}
        for name in drop:
            metrics.pop(name, None)
        metrics[section] = values
        return self.write_json(METRICS, metrics)


def _plain(value):
    """JSON for what json cannot write itself (tensors, paths, tuples of those)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _yaml_safe(values: dict) -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, tuple):
            v = list(v)
        elif not isinstance(v, (str, int, float, bool, list, dict, type(None))):
            v = str(v)
        out[k] = v
    return out
