"""Which op kinds and which layers cause the drift between a reference policy A and a candidate policy B.

Forward: A with one op kind (or one layer range) switched to B's settings, measured against A: the drift that
piece alone causes. Reverse: B with that piece taken back from A, measured against A: the drift left when it is
fixed (Fireworks' bisection: swap the MoE blocks for the reference ones and the drift went to zero). Every
variant scores the same token sequences teacher-forced (scoring.compare_policies). Drift does not add up across
pieces (a flipped routing decision amplifies everything after it), which is why both directions are reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from parityrt.numerics import NumericsPolicy
from parityrt.parity import render
from parityrt.parity.policies import differing, hybrid, module_ops, op_order
from parityrt.parity.scoring import PolicyDrift, TokenSequence, compare_policies

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
OUTSIDE_LAYERS = "outside layers"  # final norm, lm_head, logprobs: modules not under layers.N
VISION = "vision tower"  # a VL model's tower and projector: one piece of its own (its blocks are not text layers)
VISION_PREFIXES = ("vision_tower.", "mm_projector.", "visual.")


@dataclass(slots=True, kw_only=True)
class Piece:
    """A set of modules switched together: one op kind, or one layer range."""

    name: str
    kind: str  # "op" or "layers"
    modules: dict[str, str]  # module name -> op kind


def op_pieces(modules: dict[str, str]) -> list[Piece]:
    return [Piece(name=op, kind="op", modules={n: o for n, o in modules.items() if o == op})
            for op in op_order(set(modules.values()))]


def layer_pieces(modules: dict[str, str], layers_per_range: int) -> list[Piece]:
    """Contiguous ranges of `layers_per_range` decoder layers, then the modules outside the layers."""
    if layers_per_range < 1:
        raise ValueError(f"layers_per_range must be at least 1, got {layers_per_range}")
    by_layer: dict[int, dict[str, str]] = {}
    outside: dict[str, str] = {}
    vision: dict[str, str] = {}
    for name, op in modules.items():
        if name.startswith(VISION_PREFIXES):
            vision[name] = op
        elif m := LAYER_RE.search(name):
            by_layer.setdefault(int(m.group(1)), {})[name] = op
        else:
            outside[name] = op
    pieces = []
    layers = sorted(by_layer)
    for i in range(0, len(layers), layers_per_range):
        group = layers[i : i + layers_per_range]
        name = f"layer {group[0]}" if len(group) == 1 else f"layers {group[0]}-{group[-1]}"
        modules_in_range = {n: o for layer in group for n, o in by_layer[layer].items()}
        pieces.append(Piece(name=name, kind="layers", modules=modules_in_range))
    if vision:
        pieces.append(Piece(name=VISION, kind="layers", modules=vision))
    if outside:
        pieces.append(Piece(name=OUTSIDE_LAYERS, kind="layers", modules=outside))
    return pieces


@dataclass(slots=True, kw_only=True)
class Row:
    name: str
    kind: str
    differing_modules: int  # modules of the piece whose settings differ between A and B
    rank: int | None  # 1 = most drift when switched alone (per kind); None: identical in A and B, or not measured
    forward: PolicyDrift | None  # A + this piece from B, vs A
    reverse: PolicyDrift | None  # B with this piece from A, vs A


@dataclass(slots=True, kw_only=True)
class Attribution:
    reference: str
    candidate: str
    full: PolicyDrift  # B vs A
    rows: list[Row]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _drift_key(d: PolicyDrift) -> tuple[float, float, float]:
    """Ranking: full-vocabulary KL first (the most informative), then k3, then max |Δ|."""
    return (d.vocab.kl_mean, d.token.k3_mean, d.token.abs_delta_max)


def attribute(
    model: nn.Module,
    reference: NumericsPolicy,
    candidate: NumericsPolicy,
    seqs: list[TokenSequence],
    *,
    layers_per_range: int = 1,
    include_identical: bool = False,
    batch_size: int = 1,
    progress: bool = False,
) -> Attribution:
    """Measure every piece in both directions. Pieces whose modules are identical in A and B change nothing; they
    are measured only with include_identical (a determinism check: their forward drift must be exactly 0)."""
    modules = module_ops(model)
    pieces = op_pieces(modules) + layer_pieces(modules, layers_per_range)
    candidates = {"B": candidate}
    for p in pieces:
        if differing(reference, candidate, p.modules) or include_identical:
            candidates[f"fwd {p.kind} {p.name}"] = hybrid(reference, candidate, p.modules,
                                                          f"{reference.name}+{p.name}<-{candidate.name}")
            candidates[f"rev {p.kind} {p.name}"] = hybrid(candidate, reference, p.modules,
                                                          f"{candidate.name}+{p.name}<-{reference.name}")
    drift = compare_policies(model, reference, candidates, seqs, batch_size=batch_size, reference_batch_size=batch_size,
                             progress=progress, desc="attribution")
    rows = [Row(name=p.name, kind=p.kind, differing_modules=len(differing(reference, candidate, p.modules)), rank=None,
                forward=drift.get(f"fwd {p.kind} {p.name}"), reverse=drift.get(f"rev {p.kind} {p.name}"))
            for p in pieces]
    for kind in ("op", "layers"):
        # identical pieces are not ranked: their drift is 0 by construction (when measured, it checks determinism)
        measured = sorted((r for r in rows if r.kind == kind and r.forward is not None and r.differing_modules),
                          key=lambda r: _drift_key(r.forward), reverse=True)
        for rank, r in enumerate(measured, 1):
            r.rank = rank
    rows.sort(key=lambda r: (r.kind != "op", r.rank is None, r.rank or 0))
    return Attribution(reference=reference.name, candidate=candidate.name, full=drift["B"], rows=rows)


# ---- output --------------------------------------------------------------------------------------------------------

HEADERS = [
    "rank", "piece", "kind", "modules differing",
    "fwd KL mean", "fwd KL p99", "fwd k3 mean", "fwd max |Δ|", "fwd bitwise frac", "fwd tokens w/ routing flip",
    "fwd share of full KL",
    "rev KL mean", "rev k3 mean", "rev max |Δ|", "rev drift removed",
]


def _row_values(r: Row, full_kl: float) -> list[Any]:
    f, b = r.forward, r.reverse
    fwd = [None] * 7 if f is None else [
        f.vocab.kl_mean, f.vocab.kl_p99, f.token.k3_mean, f.token.abs_delta_max, f.token.bitwise_equal_fraction,
        f.routing.tokens_with_flip if f.routing else None, f.vocab.kl_mean / full_kl if full_kl > 0 else None,
    ]
    rev = [None] * 4 if b is None else [
        b.vocab.kl_mean, b.token.k3_mean, b.token.abs_delta_max, 1.0 - b.vocab.kl_mean / full_kl if full_kl > 0 else None,
    ]
    return [r.rank, r.name, r.kind, r.differing_modules, *fwd, *rev]


def table_rows(att: Attribution) -> list[list[Any]]:
    return [_row_values(r, att.full.vocab.kl_mean) for r in att.rows]


def markdown(att: Attribution) -> str:
    full, fm = att.full, render.fmt
    md_headers = [h.replace("|", "\\|") for h in HEADERS]
    flips = f", tokens with ≥1 routing flip {fm(full.routing.tokens_with_flip)}" if full.routing else ""
    text = (f"# Drift attribution: {att.reference} (A) -> {att.candidate} (B)\n\n"
            f"B vs A, teacher-forced on A's tokens ({full.token.n_tokens} scored tokens): KL mean "
            f"{fm(full.vocab.kl_mean)}, KL p99 {fm(full.vocab.kl_p99)}, k3 mean {fm(full.token.k3_mean)}, max |Δlogp| "
            f"{fm(full.token.abs_delta_max)}, bitwise-equal logprobs {fm(full.token.bitwise_equal_fraction)}{flips}.\n\n"
            "fwd: A with only this piece switched to B, vs A (the drift the piece causes alone). "
            "rev: B with this piece taken back from A, vs A (the drift left once it is fixed; "
            "'drift removed' = 1 − rev KL / full KL). Rank: by fwd KL mean, then k3, then max |Δ|.\n\n")
    for kind, title in (("op", "Op kinds"), ("layers", "Layer ranges")):
        rows = [_row_values(r, full.vocab.kl_mean) for r in att.rows if r.kind == kind]
        text += f"## {title}\n\n" + render.markdown_table(md_headers, rows) + "\n"
    if len(full.by_type) > 1:  # prompts with images: every drift split by token type
        text += ("## By token type\n\nk3 mean and KL(A‖B) mean over the positions of each token type (text before "
                 "the first image, image tokens, text after; a row is typed by the token whose hidden state predicts).\n\n")
        text += render.markdown_table(TYPE_HEADERS, type_rows(att)) + "\n"
    return text


TYPE_HEADERS = ["variant", "positions"] + [f"{m} {t}" for t in ("text before", "image", "text after") for m in ("k3", "KL")]


def _type_series(att: Attribution) -> list[tuple[str, PolicyDrift]]:
    """B, then every measured piece in both directions (ops first, as the tables)."""
    series = [("B (all switched)", att.full)]
    for r in att.rows:
        if r.forward is not None:
            series.append((f"fwd {r.name}", r.forward))
        if r.reverse is not None:
            series.append((f"rev {r.name}", r.reverse))
    return series


def type_rows(att: Attribution) -> list[list[Any]]:
    from parityrt.parity.metrics import TOKEN_TYPES

    out = []
    for label, d in _type_series(att):
        counts = "/".join(str(d.by_type[t].token.n_tokens) if t in d.by_type else "0" for t in TOKEN_TYPES)
        vals = []
        for t in TOKEN_TYPES:
            td = d.by_type.get(t)
            vals += [None, None] if td is None else [td.token.k3_mean, td.vocab.kl_mean]
        out.append([label, counts, *vals])
    return out


def plot_token_types(att: Attribution, path: Path) -> None:
    """k3 mean per token type for B and for B with each op kind taken back from A (the swap that removes it)."""
    from parityrt.parity.metrics import TOKEN_TYPES

    series = [("B vs A", att.full)] + [(f"B with {r.name} from A", r.reverse) for r in att.rows
                                       if r.kind == "op" and r.reverse is not None]
    values = [[d.by_type[t].token.k3_mean if t in d.by_type else None for t in TOKEN_TYPES] for _, d in series]
    floor = render.floor_for_log([v for vs in values for v in vs])
    fig, ax = render.plt.subplots(figsize=(1.6 + 1.4 * len(series), 3.8))
    width = 0.8 / len(TOKEN_TYPES)
    for j, t in enumerate(TOKEN_TYPES):
        xs = [i + (j - 1) * width for i in range(len(series))]
        ax.bar(xs, [max(v[j] or 0.0, floor) for v in values], width=width, label=t.replace("_", " "))
    ax.set_yscale("log")
    ax.set_xticks(range(len(series)), [s for s, _ in series], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"k3 mean (exact 0 drawn at {floor:.0e})")
    ax.set_title(f"{att.reference} -> {att.candidate}: k3 by token type", fontsize=9)
    ax.legend(fontsize=8)
    render.save(fig, path)


def plot_layers(att: Attribution, path: Path) -> None:
    """Left: drift of each layer-range piece, both directions. Right: hidden-state drift entering each MoE layer for
    B and for every op kind switched alone (where the drift enters and how it grows)."""
    fig, (left, right) = render.plt.subplots(1, 2, figsize=(12, 4.2))
    rows = [r for r in att.rows if r.kind == "layers"]
    fwd = [r.forward.vocab.kl_mean if r.forward else None for r in rows]
    rev = [r.reverse.vocab.kl_mean if r.reverse else None for r in rows]
    floor = render.floor_for_log(fwd + rev + [att.full.vocab.kl_mean])
    xs = range(len(rows))
    left.bar([x - 0.2 for x in xs], [max(v or 0.0, floor) for v in fwd], width=0.4, label="A + this range from B")
    left.bar([x + 0.2 for x in xs], [max(v or 0.0, floor) for v in rev], width=0.4, label="B with this range from A")
    left.axhline(max(att.full.vocab.kl_mean, floor), color="k", ls="--", lw=1, label="B (all switched)")
    left.set_yscale("log")
    left.set_xticks(list(xs), [r.name for r in rows], rotation=30, ha="right")
    left.set_ylabel(f"KL(A‖B) mean (exact 0 drawn at {floor:.0e})")
    left.set_title("drift per layer range")
    left.legend(fontsize=8)
    if att.full.routing:
        layers = att.full.routing.layers
        series = [("B (all switched)", att.full.hidden_rel_rms)]
        series += [(f"{r.name} alone", r.forward.hidden_rel_rms) for r in att.rows if r.kind == "op" and r.forward]
        rfloor = render.floor_for_log([v for _, ys in series for v in ys])
        for i, (label, ys) in enumerate(series):
            if any(v > 0 for v in ys):
                right.plot(range(len(layers)), [max(v, rfloor) for v in ys], label=label, **render.line_style(i))
        right.set_yscale("log")
        right.set_xticks(range(len(layers)), [LAYER_RE.search(n).group(1) if LAYER_RE.search(n) else n for n in layers])
        right.set_xlabel("MoE layer (router input)")
        right.set_ylabel(f"relative RMS drift of hidden state (0 at {rfloor:.0e})")
        right.set_title("hidden-state drift entering each MoE block")
        right.legend(fontsize=8)
    else:
        right.set_axis_off()
    render.save(fig, path)


def write(att: Attribution, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"attribution{suffix}" for suffix in (".json", ".md", ".csv", "_layers.png")]
    paths[0].write_text(json.dumps(att.to_dict(), indent=1))
    paths[1].write_text(markdown(att))
    render.write_csv(paths[2], HEADERS, table_rows(att))
    plot_layers(att, paths[3])
    if len(att.full.by_type) > 1:
        paths.append(out_dir / "attribution_token_types.csv")
        render.write_csv(paths[-1], TYPE_HEADERS, type_rows(att))
        paths.append(out_dir / "attribution_token_types.png")
        plot_token_types(att, paths[-1])
    return paths

