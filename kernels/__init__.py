"""Triton kernels of NSRU, shipped as ``nsru.kernels``.

Import this package only through ``nsru.ops``: the Triton interpreter (``TRITON_INTERPRET=1``)
must be switched on before the kernels are defined.
"""
