from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The Triton interpreter must be selected before any @triton.jit runs; CPU-only machines have no other choice.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _row_invariant_interpreter_dot() -> None:
    """The interpreter computes tl.dot with np.matmul, whose BLAS (OpenBLAS in numpy's wheel) picks kernels by the
    operands' shape: on AVX-512 Xeons a row of a 150-row block gets other fp32 bits than the same row in another
    block, so the kernels' batch-invariance tests failed there for the interpreter's sake, not the kernel's. On a
    GPU one tile's MMA gives each output the same bits whatever the other rows hold, so the tests model that: a
    float dot here is an fp32 sum over K in ascending order (exact on the integer data of the bitwise tests)."""
    import numpy as np
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        acc = d.data.dtype
        if not np.issubdtype(acc, np.floating) or a.dtype.primitive_bitwidth == 8:
            return real(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, y = a.data.astype(acc), b.data.astype(acc)
        out = np.zeros(np.broadcast_shapes(x.shape[:-1] + (1,), (1,) * (y.ndim - 1) + y.shape[-1:]), dtype=acc)
        for k in range(x.shape[-1]):
            out += x[..., k : k + 1] * y[..., k : k + 1, :]
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _row_invariant_interpreter_dot()


# pytest-xdist runs the suite in one worker per core (pyproject addopts): one torch thread each, or the workers'
# OpenMP threads fight over the cores (a 50 s test took 155 s). Bits compared within a process are unaffected.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# Modules whose CPU tests run Triton kernels on CPU tensors: possible only through the interpreter, which is
# selected only where there is no GPU (with a GPU, `@triton.jit` compiles for it and refuses CPU tensors).
INTERPRETER_MODULES = {"test_triton_gemm", "test_triton_moe", "test_triton_norm_attention", "test_triton_gdn",
                       "test_kernel_policies", "test_triton_autograd"}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors through the interpreter, which is only "
                                       "selected on machines without a GPU; the module's `cuda` tests cover the GPU")
        for item in items:
            if item.module.__name__ in INTERPRETER_MODULES and "cuda" not in item.keywords:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parityrt_cache")
