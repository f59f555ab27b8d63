"""The README's commands and figures stay true."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _main_job_command() -> str:
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        if block.strip().endswith("nsru demo"):
            return block.strip()
    raise AssertionError("README: no bash block ending in `nsru demo` (the main job)")


def test_main_job_guard_sees_the_built_extension():
    """The main job rebuilds the extension only when the guard fails; importing ``nsru._C``
    before torch always failed (libc10.so not found), so it rebuilt every time."""
    guard = re.search(r'\((python -c "[^"]*") 2>/dev/null \|\|', _main_job_command())
    assert guard, "README main job: expected `(python -c \"...\" 2>/dev/null || pip install ...)`"
    done = subprocess.run(guard.group(1), shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{guard.group(1)} failed although the extension is built: {done.stderr[-500:]}"


def test_readme_tables_match_their_result_files():
    """Every generated table (demo, real model, CPU ratios, memory) equals what
    benchmarks/readme_tables.py makes from the committed files: no figure without its source."""
    import sys

    done = subprocess.run([sys.executable, "benchmarks/readme_tables.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-1000:]
