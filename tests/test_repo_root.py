"""Commands run from the repository root, where ``python -m`` puts the root first on ``sys.path``.

The top-level ``kernels/`` folder must not shadow the PyPI package ``kernels`` that transformers
imports (it did: every model import failed there with ``cannot import name 'CUDAProperties'``).
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_import_kernels_from_the_root_is_never_ours():
    probe = _run("-c", "import sys\n"
                       "try:\n    import kernels\nexcept ImportError:\n    sys.exit(0)\n"
                       "print(getattr(kernels, '__file__', None), list(getattr(kernels, '__path__', [])))")
    assert probe.returncode == 0, probe.stderr
    assert str(ROOT / "kernels") not in probe.stdout, f"`import kernels` resolved to the repository's folder: {probe.stdout}"


def test_models_import_from_the_root():
    done = _run("-c", "from transformers import LlamaForCausalLM; import nsru.kernels.lowrank_linear as k; print(k.__file__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("lowrank_linear.py")


def test_python_m_nsru_help_from_the_root():
    done = _run("-m", "nsru", "--help")
    assert done.returncode == 0, done.stderr
    assert "unlearn" in done.stdout and "Traceback" not in done.stderr
    sub = _run("-m", "nsru", "unlearn", "--help")
    assert sub.returncode == 0 and "--forget" in sub.stdout, sub.stderr
