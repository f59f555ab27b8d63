"""NSRU's Triton kernels, whose sources are the repository's top-level ``kernels/`` folder.

That folder is deliberately not a package: ``import kernels`` belongs to the PyPI project of that
name, which transformers imports, and a top-level package of ours would shadow it whenever the
repository root is on ``sys.path`` (``python -m pytest``, ``python -m nsru`` there). A wheel ships
the kernel files inside ``nsru/kernels/`` (``setup.py``'s ``package_dir``); in a source checkout and
an editable install this module is found instead and points the package at ``kernels/``.

Import the kernels only through ``nsru.ops``: the Triton interpreter (``TRITON_INTERPRET=1``) must be
switched on before they are defined.
"""

import os

_SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")
if os.path.isfile(os.path.join(_SOURCES, "lowrank_linear.py")):
    __path__.append(_SOURCES)
