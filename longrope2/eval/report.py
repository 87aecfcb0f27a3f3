"""The eval's report: ``summary.json``, ``report.md`` and the plots, from the records of
``results.jsonl``.

Each accuracy cell carries its sample count and a 95% interval (Wilson for 0/1 scores, bootstrap
for RULER's partial credit), so a cell of one or two samples reads as what it is. RULER's task
scores are ``round(100 * mean, 2)`` as RULER rounds them; the RULER average is the mean over the
tasks present (named in the report), its interval Wilson on the pooled samples for 0/1 scores, else a
bootstrap that resamples each task's samples.
Every rope column states the transformers rope type it ran with.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from longrope2.eval.model import Rope
from longrope2.eval.ruler import RULER_TASKS, task_score
from longrope2.eval.scoring import average_interval, interval

PPL_TASKS = ("needle_ppl", "book_ppl", "short_ppl")
TASK_TITLES = {
    "needle_ppl": "Needle-driven PPL (answer tokens; lower is better)",
    "book_ppl": "Book PPL (last tokens of each window; lower is better)",
    "short_ppl": "Short-context book PPL (retention; lower is better)",
    "passkey": "Passkey retrieval accuracy (%, exact match)",
    "needle": "Needle-in-a-haystack accuracy (%, exact match, mean over depths)",
}


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize(records: Iterable[dict], ropes: list[Rope]) -> dict[str, Any]:
    fingerprints = {r.fingerprint: r.label for r in ropes}
    nll: dict = defaultdict(lambda: [0.0, 0, 0])  # (task, rope, length) -> nll, tokens, samples
    scores: dict = defaultdict(list)  # (task, rope, length) -> [score]
    depth_scores: dict = defaultdict(list)  # (rope, length, depth) -> [score] (needle)
    generated: dict = defaultdict(lambda: [0, 0.0])  # (rope, length) -> samples, seconds (generation tasks)
    seconds = 0.0
    for record in records:
        seconds += record.get("seconds", 0.0)
        label = fingerprints.get(record.get("fingerprint"))
        if label is None or record["task"] == "lm_eval":
            continue
        key = (record["task"], label, record["length"])
        if "nll" in record:
            acc = nll[key]
            acc[0] += record["nll"]
            acc[1] += record["count"]
            acc[2] += 1
        else:
            scores[key].append(record["score"])
            generated[label, record["length"]][0] += 1
            generated[label, record["length"]][1] += record.get("seconds", 0.0)
            if record["task"] == "needle" and record.get("depth") is not None:
                depth_scores[label, record["length"], record["depth"]].append(record["score"])
    summary: dict[str, Any] = {"ropes": {r.label: {"spec": r.spec, "fingerprint": r.fingerprint,
                                                   "rope_type": r.rope_type} for r in ropes},
                               "metrics": {}, "compute_seconds": round(seconds, 1)}
    metrics = summary["metrics"]
    for (task, label, length), (total, count, samples) in nll.items():
        metrics.setdefault(task, {}).setdefault(label, {})[str(length)] = {
            "ppl": math.exp(total / count) if count else math.inf, "samples": samples, "tokens": count}
    ruler_scores: dict = defaultdict(lambda: defaultdict(dict))  # rope -> length -> task -> [score]
    for (task, label, length), values in sorted(scores.items()):
        lo, hi = interval(values)
        accuracy = task_score(values) if task in RULER_TASKS else 100 * sum(values) / len(values)
        metrics.setdefault(task, {}).setdefault(label, {})[str(length)] = {
            "accuracy": accuracy, "samples": len(values), "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}
        if task in RULER_TASKS:
            ruler_scores[label][str(length)][task] = values
    if ruler_scores:
        summary["ruler_average"] = {}
        for label, by_length in ruler_scores.items():
            for length, by_task in by_length.items():
                lo, hi = average_interval(list(by_task.values()))
                summary["ruler_average"].setdefault(label, {})[length] = {
                    "accuracy": round(sum(task_score(v) for v in by_task.values()) / len(by_task), 2),
                    "tasks": len(by_task), "task_names": sorted(by_task, key=RULER_TASKS.index),
                    "samples": sum(len(v) for v in by_task.values()), "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}
    if generated:
        summary["generation_throughput"] = {label: {} for label in {k[0] for k in generated}}
        for (label, length), (n, secs) in generated.items():
            summary["generation_throughput"][label][str(length)] = {
                "samples": n, "seconds": round(secs, 1), "samples_per_s": round(n / secs, 4) if secs else None}
    if depth_scores:
        heat: dict = defaultdict(dict)
        for (label, length, depth), values in depth_scores.items():
            heat[label].setdefault(str(length), {})[f"{depth:g}"] = 100 * sum(values) / len(values)
        summary["needle_depths"] = heat
    short = metrics.get("short_ppl")
    if short:
        base = "original" if "original" in short else next(iter(short))
        summary["retention_baseline"] = base
        summary["short_ppl_ratio"] = {label: {n: cell["ppl"] / short[base][n]["ppl"]
                                              for n, cell in by.items() if n in short[base]}
                                      for label, by in short.items()}
    return summary


def _sorted_lengths(by_rope: dict) -> list[str]:
    return sorted({n for by in by_rope.values() for n in by}, key=int)


def _format(cell: dict, field: str, fmt: str) -> str:
    text = format(cell[field], fmt)
    if "ci95" in cell:  # an accuracy: its interval and sample count
        lo, hi = cell["ci95"]
        text += f" [{lo:.0f}-{hi:.0f}] n={cell['samples']}"
    return text


def _table(title: str, by_rope: dict, field: str, fmt: str, labels: list[str]) -> list[str]:
    lengths = _sorted_lengths(by_rope)
    lines = [f"### {title}", "", "| rope | " + " | ".join(f"{int(n) // 1024}k" if int(n) % 1024 == 0 else n
                                                         for n in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for label in labels:
        if label in by_rope:
            cells = [_format(by_rope[label][n], field, fmt) if n in by_rope[label] else "" for n in lengths]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(config, summary: dict, geometry, elapsed: float, complete: bool) -> str:
    labels = list(summary["ropes"])
    metrics = summary["metrics"]
    counts = []
    for task, section in (("needle_ppl", config.needle_ppl), ("book_ppl", config.book_ppl),
                          ("short_ppl", config.short_context), ("passkey", config.passkey),
                          ("needle", config.needle), ("ruler", config.ruler)):
        if section.samples:
            extra = ""
            if task in ("passkey", "needle"):
                extra = f" x {len(section.depths)} depths" if section.depths else " (random depths)"
            elif task == "ruler":
                source = f"RULER's data files in {section.data_dir}" if section.data_dir else \
                    "generated here (eval/ruler_gen.py)"
                extra = (f" x {len(section.tasks)} tasks asked (those skipped are named below), {source}"
                         + (", chat template" if section.chat_template else ""))
            elif task in ("book_ppl", "short_ppl"):
                extra = f", last {section.last_tokens} tokens scored"
            counts.append(f"{task} {section.samples}{extra}")
    lines = [f"# longrope2 eval: {config.model}", "",
             f"Original window {geometry.original_max_position_embeddings} tokens; greedy decoding "
             f"(batch size {config.batch_size}); {config.attn_implementation} attention, {config.dtype}; seed "
             f"{config.seed}; {'complete' if complete else 'PARTIAL (still running or interrupted)'}, "
             f"{summary['compute_seconds'] / 60:.1f} min of sample compute in all ({elapsed / 60:.1f} min in the "
             f"last run).", "",
             "Samples per length: " + ("; ".join(counts) or "none") + ".", "",
             "Rope configs (transformers rope type): " + ", ".join(
                 f"`{label}` ({summary['ropes'][label]['spec']}: {summary['ropes'][label]['rope_type']})"
                 for label in labels) + ".", "",
             "Accuracy cells: score [95% interval] n=samples (Wilson for 0/1 scores, else bootstrap).", ""]
    for task in ("needle_ppl", "book_ppl"):
        if task in metrics:
            lines += _table(TASK_TITLES[task], metrics[task], "ppl", ".3f", labels)
    for task in ("passkey", "needle"):
        if task in metrics:
            lines += _table(TASK_TITLES[task], metrics[task], "accuracy", ".1f", labels)
    if "ruler_average" in summary:
        for task in config.ruler.tasks:
            if task in metrics:
                lines += _table(f"RULER {task} (%, RULER's score)", metrics[task], "accuracy", ".2f", labels)
        names = sorted({t for by in summary["ruler_average"].values() for c in by.values() for t in c["task_names"]},
                       key=RULER_TASKS.index)
        lines += _table(f"RULER average over the {len(names)} tasks present (%): {', '.join(names)}",
                        summary["ruler_average"], "accuracy", ".2f", labels)
    for note in summary.get("skipped", []):
        lines.append(f"- {note}")
    if summary.get("skipped"):
        lines.append("")
    if "generation_throughput" in summary:
        lines += ["### Generation throughput (samples/s of compute, all generation tasks)", ""]
        for label, by in summary["generation_throughput"].items():
            lines.append(f"- {label}: " + ", ".join(f"{int(n) // 1024}k {c['samples_per_s']} ({c['samples']} in "
                                                    f"{c['seconds']:.0f} s)" for n, c in sorted(by.items(),
                                                                                                key=lambda kv: int(kv[0]))))
        lines.append("")
    if "short_ppl" in metrics:
        lines += _table(TASK_TITLES["short_ppl"], metrics["short_ppl"], "ppl", ".3f", labels)
        ratio = {label: {n: {"r": v} for n, v in by.items()} for label, by in summary["short_ppl_ratio"].items()}
        lines += _table(f"Short-context PPL ratio vs `{summary['retention_baseline']}` (1.000 = no loss)", ratio, "r",
                        ".4f", labels)
    lm_eval = summary.get("lm_eval")
    if lm_eval:
        lines += ["### lm-evaluation-harness", ""]
        if "skipped" in lm_eval:
            lines += [f"Skipped: {lm_eval['skipped']}", ""]
        else:
            lines += ["```", json.dumps(lm_eval, indent=1), "```", ""]
    return "\n".join(lines)


def write_report(config, out: Path, ropes: list[Rope], records: Iterable[dict], geometry, started: float,
                 plots: bool = False, complete: bool = False, lm_eval: dict | None = None,
                 skipped: list[str] | None = None) -> dict[str, Any]:
    summary = summarize(records, ropes)
    if lm_eval is not None:
        summary["lm_eval"] = lm_eval
    if skipped:
        summary["skipped"] = skipped
    summary["complete"] = complete
    summary["original_window"] = geometry.original_max_position_embeddings
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write(out / "report.md", markdown(config, summary, geometry, time.time() - started, complete) + "\n")
    if plots:
        plot_scores(out / "scores.png", summary, geometry.original_max_position_embeddings)
        if "needle_depths" in summary:
            plot_needle_heatmap(out / "needle_heatmap.png", summary)
    return summary


def plot_scores(path: Path, summary: dict, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, summary["metrics"][t], "ppl") for t in ("needle_ppl", "book_ppl", "short_ppl")
              if t in summary["metrics"]]
    panels += [(t, summary["metrics"][t], "accuracy") for t in ("passkey", "needle") if t in summary["metrics"]]
    if "ruler_average" in summary:
        panels.append(("ruler_average", summary["ruler_average"], "accuracy"))
    if not panels:
        return
    labels = list(summary["ropes"])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, by_rope, field) in zip(axes.flat, panels):
        for i, label in enumerate(labels):
            if label in by_rope:
                lengths = sorted(by_rope[label], key=int)
                ax.plot([int(n) for n in lengths], [by_rope[label][n][field] for n in lengths], ".-",
                        color=f"C{i}", label=label)
        ax.axvline(window, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(n) for by in by_rope.values() for n in by})
        ax.set_xticks(ticks, [f"{n / 1024:g}k" for n in ticks])
        ax.minorticks_off()
        if field == "ppl":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-5, 105)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity" if field == "ppl" else "accuracy (%)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_needle_heatmap(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    heat = summary["needle_depths"]
    labels = [label for label in summary["ropes"] if label in heat]
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.8), squeeze=False)
    for ax, label in zip(axes[0], labels):
        lengths = sorted(heat[label], key=int)
        depths = sorted({d for by in heat[label].values() for d in by}, key=float)
        grid = [[heat[label][n].get(d, float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (row, col), value in np.ndenumerate(np.array(grid, dtype=float)):
            if math.isfinite(value):
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{int(n) / 1024:g}k" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_title(label)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
