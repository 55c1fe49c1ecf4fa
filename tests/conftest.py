from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The Triton interpreter must be selected before any @triton.jit runs; CPU-only machines have no other choice.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Modules whose CPU tests run Triton kernels on CPU tensors: possible only through the interpreter, which is
# selected only where there is no GPU (with a GPU, `@triton.jit` compiles for it and refuses CPU tensors).
INTERPRETER_MODULES = {"test_triton_gemm", "test_triton_moe", "test_triton_norm_attention", "test_triton_gdn",
                       "test_kernel_policies"}


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
