"""A sweep directory (one metrics.json per cell, from scripts/sweep.py) -> report.md, report.csv and PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parityrt.parity import render
from parityrt.parity.io import RunError, load_run
from parityrt.parity.metrics import mean_unique_outputs


@dataclass(slots=True, kw_only=True)
class Cell:
    path: Path
    metrics: dict[str, Any]

    @property
    def model(self) -> str:
        return self.metrics["cell"]["model"]

    @property
    def label(self) -> str:
        c = self.metrics["cell"]
        return f"{c['label']} {c['parallel']} bs{c['batch_size']}"


def load_cells(sweep_dir: Path) -> list[Cell]:
    if not sweep_dir.is_dir():
        raise RunError(f"{sweep_dir}: no such sweep directory")
    cells = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
            metrics["cell"]["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RunError(f"{path}: not a sweep cell's metrics.json ({e!r})") from None
        cells.append(Cell(path=path.parent, metrics=metrics))
    if not cells:
        raise RunError(f"{sweep_dir}: no cell directories with metrics.json (run scripts/sweep.py -m ... first)")
    return sorted(cells, key=lambda c: (c.model, c.label))


COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("cell", "model")),
    ("numerics", ("cell", "label")),
    ("parallel", ("cell", "parallel")),
    ("batch", ("cell", "batch_size")),
    ("reference", ("cell", "reference")),
    ("gen tok/s", ("throughput", "generate_tokens_per_s")),
    ("score tok/s", ("throughput", "score_tokens_per_s")),
    ("scored tokens", ("teacher_forced", "token", "n_tokens")),
    ("bitwise frac", ("teacher_forced", "token", "bitwise_equal_fraction")),
    ("k1 mean", ("teacher_forced", "token", "k1_mean")),
    ("k3 mean", ("teacher_forced", "token", "k3_mean")),
    ("mean |Δ|", ("teacher_forced", "token", "abs_delta_mean")),
    ("max |Δ|", ("teacher_forced", "token", "abs_delta_max")),
    ("KL mean", ("teacher_forced", "vocab", "kl_mean")),
    ("KL p99", ("teacher_forced", "vocab", "kl_p99")),
    ("top-5 div", ("teacher_forced", "vocab", "top5_prob_div_mean")),
    ("argmax flips", ("teacher_forced", "vocab", "argmax_flip_rate")),
    # image prompts (VL models): k3 split by token type (text before the first image, image tokens, text after)
    ("k3 text before", ("teacher_forced", "by_type", "text_before", "token", "k3_mean")),
    ("k3 image", ("teacher_forced", "by_type", "image", "token", "k3_mean")),
    ("k3 text after", ("teacher_forced", "by_type", "text_after", "token", "k3_mean")),
    ("routing flips", ("teacher_forced", "routing", "flip_rate_mean")),
    ("tokens w/ flip", ("teacher_forced", "routing", "tokens_with_flip")),
    ("outputs differing", ("free_running", "diverged")),
    ("first divergence", ("free_running", "mean_first_divergence")),
    ("unique over repeats", ("unique_outputs_over_repeats",)),
]


def rows(cells: list[Cell]) -> list[list[Any]]:
    return [[render.dig(c.metrics, *keys) for _, keys in COLUMNS] for c in cells]


def unique_across_cells(cells: list[Cell]) -> list[list[Any]]:
    """Per model: distinct outputs per prompt over all its cells (TBIK's 'unique outputs over configurations')."""
    by_model: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        if not c.metrics["cell"].get("image_prompts"):  # image-prompt cells generate nothing (teacher-forced only)
            by_model[c.model].append(c)
    out = []
    for model, group in by_model.items():
        runs = [load_run(c.path, with_logits=False) for c in group]
        rids = list(runs[0].records)
        if any(list(r.records) != rids for r in runs):
            raise RunError(f"{model}: the cells answered different requests; a sweep must use one prompt set")
        out.append([model, len(group), mean_unique_outputs([[r.records[rid].output_ids for r in runs] for rid in rids])])
    return out


def markdown(cells: list[Cell], sweep_dir: Path) -> str:
    headers = [h.replace("|", "\\|") for h, _ in COLUMNS]
    text = (f"# Parity sweep report\n\nSweep: `{sweep_dir}` ({len(cells)} cells). Teacher-forced drift of each cell "
            "against its reference on the reference's tokens (Δ = logp_cell − logp_ref; k3 = e^Δ − Δ − 1; KL(ref‖cell) "
            "over the full vocabulary); 'outputs differing' and 'first divergence' compare the cell's own greedy/seeded "
            "generation with the reference's. Definitions: docs/parity.md.\n\n")
    text += render.markdown_table(headers, rows(cells))
    text += "\n## Unique outputs per prompt across cells\n\n"
    text += render.markdown_table(["model", "cells", "unique outputs per prompt (mean)"], unique_across_cells(cells))
    return text


# ---- plots -----------------------------------------------------------------------------------------------------


def _by_model(cells: list[Cell]) -> dict[str, list[Cell]]:
    groups: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        groups[c.model].append(c)
    return groups


def plot_drift_by_policy(cells: list[Cell], path: Path) -> None:
    groups = _by_model(cells)
    height = 1.7 + 0.55 * max(map(len, groups.values()))
    fig, axes = render.plt.subplots(1, len(groups), figsize=(6 * len(groups), height), squeeze=False)
    for ax, (model, group) in zip(axes[0], groups.items()):
        kl = [render.dig(c.metrics, "teacher_forced", "vocab", "kl_mean") for c in group]
        k3 = [render.dig(c.metrics, "teacher_forced", "token", "k3_mean") for c in group]
        floor = render.floor_for_log(kl + k3)
        ys = range(len(group))
        ax.barh([y - 0.2 for y in ys], [max(v or 0.0, floor) for v in kl], height=0.4, label="KL(ref‖cell) mean")
        ax.barh([y + 0.2 for y in ys], [max(v or 0.0, floor) for v in k3], height=0.4, label="k3 mean")
        for y, (a, b) in enumerate(zip(kl, k3)):
            if not a and not b:
                ax.text(floor, y, "  0: bitwise identical", va="center", fontsize=8)
        ax.axvline(1e-3, color="r", ls=":", lw=1, label="k3 = 1e-3 (Fireworks pass threshold)")
        ax.set_xscale("log")
        ax.set_yticks(list(ys), [c.label for c in group], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"drift vs reference (exact 0 drawn at {floor:.0e})")
        ax.set_title(model)
        ax.legend(fontsize=7)
    render.save(fig, path)


HIDDEN = ("teacher_forced", "hidden_rel_rms")
FLIPS_PER_LAYER = ("teacher_forced", "routing", "flip_rate_per_layer")


def merge_identical(series: list[tuple[Cell, list[float]]]) -> list[tuple[str, list[float]]]:
    """One line per distinct per-layer series: cells with identical values share it (batch sizes, TP-invariant
    layouts), labelled 'policy: layout bs, layout bs' when they share the policy."""
    groups: dict[tuple[float, ...], list[Cell]] = {}
    for cell, ys in series:
        groups.setdefault(tuple(ys), []).append(cell)
    out = []
    for ys, cells in groups.items():
        policies = {c.metrics["cell"]["label"] for c in cells}
        where = [f"{c.metrics['cell']['parallel']} bs{c.metrics['cell']['batch_size']}" for c in cells]
        label = f"{policies.pop()}: {', '.join(where)}" if len(policies) == 1 else " = ".join(c.label for c in cells)
        out.append((label, list(ys)))
    return out


def plot_drift_per_layer(cells: list[Cell], path: Path) -> None:
    groups = _by_model(cells)
    fig, axes = render.plt.subplots(2, len(groups), figsize=(6.5 * len(groups), 7.5), squeeze=False)
    for col, (model, group) in enumerate(groups.items()):
        top, bottom = axes[0][col], axes[1][col]
        hidden = merge_identical([(c, render.dig(c.metrics, *HIDDEN) or []) for c in group])
        flips = merge_identical([(c, render.dig(c.metrics, *FLIPS_PER_LAYER) or []) for c in group])
        floor = render.floor_for_log([v for _, ys in hidden for v in ys])
        layers = render.dig(group[0].metrics, "teacher_forced", "routing", "layers") or []
        for i, (label, ys) in enumerate(hidden):
            if any(v > 0 for v in ys):
                top.plot(range(len(ys)), [max(v, floor) for v in ys], label=label, **render.line_style(i))
        for i, (label, ys) in enumerate(flips):
            if any(v > 0 for v in ys):
                bottom.plot(range(len(ys)), ys, label=label, **render.line_style(i))
        names = [n.split(".mlp")[0].replace("layers.", "") for n in layers]
        for ax in (top, bottom):
            ax.set_xticks(range(len(layers)), names)
            ax.set_xlabel("MoE layer")
        top.set_yscale("log")
        top.set_ylabel(f"hidden-state relative RMS drift (0 at {floor:.0e})")
        top.set_title(f"{model}: drift entering each MoE block")
        bottom.set_ylabel("routing flip rate (top-k set differs)")
        bottom.set_title(f"{model}: routing flips per layer")
        for ax in (top, bottom):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "every cell is bitwise equal to the reference here", ha="center", transform=ax.transAxes)
    render.save(fig, path)


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal (speed, drift) points: no other point is at least as fast with less drift.
    Returned fastest first."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    best, keep = float("inf"), []
    for i in order:
        if points[i][1] < best:
            keep.append(i)
            best = points[i][1]
    return keep


def plot_speed_vs_drift(cells: list[Cell], path: Path) -> None:
    """Colour: policy; marker: parallel layout; hollow: batch size > 1. Only frontier points are labelled."""
    groups = _by_model(cells)
    policies = sorted({c.metrics["cell"]["label"] for c in cells})
    layouts = sorted({c.metrics["cell"]["parallel"] for c in cells})
    color = {p: render.plt.get_cmap("tab10")(i % 10) for i, p in enumerate(policies)}
    marker = {p: "osD^v<>"[i % 7] for i, p in enumerate(layouts)}
    fig, axes = render.plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    for ax, (model, group) in zip(axes[0], groups.items()):
        speed = [render.dig(c.metrics, "throughput", "score_tokens_per_s") or 0.0 for c in group]
        drift = [render.dig(c.metrics, "teacher_forced", "vocab", "kl_mean") or 0.0 for c in group]
        floor = render.floor_for_log(drift)
        pts = [(s, max(d, floor)) for s, d in zip(speed, drift)]
        for c, (x, y) in zip(group, pts):
            cell = c.metrics["cell"]
            ax.scatter([x], [y], color=color[cell["label"]], marker=marker[cell["parallel"]], s=50,
                       facecolors="none" if cell["batch_size"] > 1 else color[cell["label"]])
        front = frontier(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1)
        for i in front:
            ax.annotate(group[i].label, pts[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
        handles = [render.plt.Line2D([], [], ls="", marker="o", color=color[p], label=p) for p in policies]
        handles += [render.plt.Line2D([], [], ls="", marker=marker[p], color="grey", label=p) for p in layouts]
        handles += [render.plt.Line2D([], [], ls="--", color="k", label="frontier (labelled)"),
                    render.plt.Line2D([], [], ls="", marker="o", mfc="none", color="grey", label="batch > 1")]
        ax.legend(handles=handles, fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("teacher-forced scoring throughput (tokens/s)")
        ax.set_ylabel(f"KL(ref‖cell) mean (exact 0 drawn at {floor:.0e})")
        ax.set_title(model)
    render.save(fig, path)


def write_report(sweep_dir: Path, out_dir: Path) -> list[Path]:
    cells = load_cells(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ("report.md", "report.csv", "drift_by_policy.png", "drift_per_layer.png", "speed_vs_drift.png")
    paths = [out_dir / n for n in names]
    paths[0].write_text(markdown(cells, sweep_dir))
    render.write_csv(paths[1], ["cell_dir"] + [h for h, _ in COLUMNS],
                     [[c.path.name, *r] for c, r in zip(cells, rows(cells))])
    plot_drift_by_policy(cells, paths[2])
    plot_drift_per_layer(cells, paths[3])
    plot_speed_vs_drift(cells, paths[4])
    return paths
