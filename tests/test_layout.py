from __future__ import annotations

from pathlib import Path

import kernels
import models
import parityrt

REPO = Path(__file__).resolve().parents[1]


def test_packages_resolve_inside_the_repo() -> None:
    """A PyPI package named `kernels` exists (Hugging Face's); ours must be the one imported."""
    for pkg in (kernels, models, parityrt):
        assert Path(pkg.__file__).resolve().is_relative_to(REPO), pkg.__file__
