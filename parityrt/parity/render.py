"""Tables (Markdown, CSV) and plots (PNG) for parity results. Matplotlib runs headless (Agg)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def fmt(x: Any) -> str:
    """Numbers for tables: exact zero stays '0' (bitwise parity must be visible as such), small values in e-notation."""
    if x is None:
        return "–"
    if isinstance(x, bool) or isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0.0:
            return "0"
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Full-precision values (repr of floats), empty cells for missing ones."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows([["" if v is None else v for v in row] for row in rows])


# ---- compare ------------------------------------------------------------------------------------------------------


def dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]..., or None where a level is missing or null (metrics a run could not compute)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


# (label, section, key) of the metrics both compare modes report
COMPARE_ROWS = [
    ("tokens compared", "token", "n_tokens"),
    ("bitwise-equal logprob fraction", "token", "bitwise_equal_fraction"),
    ("k1 mean", "token", "k1_mean"),
    ("k3 mean", "token", "k3_mean"),
    ("mean \\|Δlogp\\|", "token", "abs_delta_mean"),
    ("max \\|Δlogp\\|", "token", "abs_delta_max"),
    ("positions with full logits", "vocab", "n_positions"),
    ("KL(A‖B) mean", "vocab", "kl_mean"),
    ("KL(A‖B) p99", "vocab", "kl_p99"),
    ("top-5 prob divergence mean", "vocab", "top5_prob_div_mean"),
    ("argmax flip rate", "vocab", "argmax_flip_rate"),
]


def compare_markdown(result: dict[str, Any]) -> str:
    rec, tf = result["recorded"], result["teacher_forced"]
    diff = ", ".join(f"{op} ×{n}" for op, n in result["differing_modules"].items()) or "none (or not recorded)"
    firsts = [f for f in (dig(tf, "first_argmax_flip") or []) if f is not None]
    rows = [(label, dig(rec, section, key), dig(tf, section, key)) for label, section, key in COMPARE_ROWS]
    rows += [
        ("routing flip rate (all layers)", None, dig(tf, "routing", "flip_rate_mean")),
        ("tokens with ≥1 routing flip", None, dig(tf, "routing", "tokens_with_flip")),
        ("requests whose outputs differ", f"{rec['diverged']}/{rec['requests']}", None),
        ("mean first divergence index", rec["mean_first_divergence"], sum(firsts) / len(firsts) if firsts else None),
        ("unique outputs per prompt (2 runs)", rec["unique_outputs_mean"], None),
    ]
    text = (f"# parity compare\n\nA: `{result['a']['path']}` (policy {result['a']['policy']})  \n"
            f"B: `{result['b']['path']}` (policy {result['b']['policy']})  \n"
            f"modules whose resolved settings differ: {diff}\n\n"
            "Δ = logp_B − logp_A per scored token; k1 = −Δ, k3 = e^Δ − Δ − 1; KL(A‖B) over the full vocabulary. "
            "As recorded: same-context positions only. Teacher-forced: B re-scores A's tokens"
            + (" (first divergence there = first greedy flip).\n\n" if tf else " (not run).\n\n"))
    text += markdown_table(["metric", "as recorded", "teacher-forced"], rows)
    if tf and len(tf.get("by_type") or {}) > 1:  # sequences with images: the teacher-forced drift per token type
        text += "\n" + markdown_table(
            ["token type", "positions", "k3 mean", "KL(A‖B) mean", "bitwise-equal fraction", "tokens with ≥1 routing flip"],
            [(t, d["token"]["n_tokens"], d["token"]["k3_mean"], d["vocab"]["kl_mean"],
              d["token"]["bitwise_equal_fraction"], d["tokens_with_routing_flip"]) for t, d in tf["by_type"].items()])
    if tf and tf.get("routing"):
        text += "\n" + markdown_table(
            ["router", "routing flip rate", "hidden-state relative RMS drift"],
            list(zip(tf["routing"]["layers"], tf["routing"]["flip_rate_per_layer"], tf["hidden_rel_rms"])),
        )
    return text


# ---- plots -----------------------------------------------------------------------------------------------------


def floor_for_log(values: Sequence[float | None]) -> float:
    """Where to draw exact zeros on a log axis: a decade below the smallest positive value."""
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return 10 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-12


def line_style(i: int) -> dict[str, Any]:
    """Distinct dash and marker per series, so that series with identical values stay visible on top of each other."""
    return {"color": plt.get_cmap("tab10")(i % 10), "ls": ["-", "--", ":", "-."][i % 4], "marker": "osv^Dx"[i % 6],
            "markersize": 7 - i % 4}


def save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
