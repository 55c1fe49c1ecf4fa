from __future__ import annotations

import ast
from pathlib import Path

import kernels
import models
import parityrt

REPO = Path(__file__).resolve().parents[1]


def test_packages_resolve_inside_the_repo() -> None:
    """A PyPI package named `kernels` exists (Hugging Face's); ours must be the one imported."""
    for pkg in (kernels, models, parityrt):
        assert Path(pkg.__file__).resolve().is_relative_to(REPO), pkg.__file__


# the engine's internals the server used to reach into (issue 12); the facade (parityrt.engine.api) replaces them
ENGINE_INTERNALS = {"runner", "scheduler", "kv", "states", "seqs", "version_events", "graphs", "cfg", "gumbel"}


def test_the_server_meets_the_engine_through_its_facade_only() -> None:
    """parityrt/server imports nothing of parityrt.engine but parityrt.engine.api (the Engine facade and the typed
    requests and outputs), and reads none of the engine's internals."""
    bad = []
    for path in sorted((REPO / "parityrt" / "server").rglob("*.py")):
        where = path.relative_to(REPO)
        package = list(where.with_suffix("").parts[:-1])  # parityrt/server/protocol/x.py -> parityrt.server.protocol
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                names = [".".join(base + ([node.module] if node.module else []))]
                if names[0] == "parityrt.engine":  # `from parityrt.engine import api` is the facade too
                    names = [f"parityrt.engine.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = []
            bad += [f"{where}:{node.lineno} imports {n}" for n in names
                    if n.startswith("parityrt.engine") and n != "parityrt.engine.api"]
            if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS:
                bad.append(f"{where}:{node.lineno} reads .{node.attr}")
    assert bad == [], "\n".join(bad)
