"""Atomic writes: a reader sees the old file or folder or the new one, never half of one.

:func:`atomic_write` hands ``write`` a temporary sibling of the target (same folder, so the same
file system), then moves it into place with ``os.replace``. A crash or an exception while writing
leaves the target as it was. The adapter files, the trainer's checkpoints and the benchmark's model
cache all write through it. Standard library only, so any layer may import it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(
    target: str | os.PathLike,
    write: Callable[[Path], object],
    *,
    directory: bool = False,
    replace: bool = True,
) -> bool:
    """Call ``write(tmp)`` on a temporary sibling of ``target``, then move it to ``target``.

    ``directory=False``: ``tmp`` is a file path that ``write`` creates. ``directory=True``: ``tmp``
    is an empty folder that ``write`` fills (``os.replace`` cannot overwrite a non-empty folder, so
    an existing one is removed just before the move). ``replace=False``: when ``target`` exists by
    the time ``write`` returns (another process finished first), keep it and discard ours.
    Returns whether our copy was put in place. The temporary name starts with a dot and is unique
    per call, so concurrent writers never share one and globs such as ``checkpoint-*`` skip it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        if directory:
            tmp.mkdir()
        write(tmp)
        if os.path.lexists(target):
            if not replace:
                _remove(tmp)
                return False
            if directory:
                _remove(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if directory and not replace and target.exists():  # lost a race for the same folder
                _remove(tmp)
                return False
            raise
    except BaseException:
        _remove(tmp)
        raise
    return True
