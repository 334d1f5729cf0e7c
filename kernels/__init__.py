"""Triton kernels, each beside a torch reference of the same signature.

Every module `batchgen.kernels.<name>` defines `<name>(...)` (the Triton launcher) and `<name>_ref(...)`
(plain torch, the CPU path and the correctness oracle). `batchgen.kernels.ops` picks one by device;
`batchgen.kernels.testing` builds random paged batches for the tests and benchmarks/kernels_gpu.py.
"""
