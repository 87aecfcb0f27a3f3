"""The miniature replication's report: tables, plots and the verdicts on the paper's two claims,
from what the pipeline wrote (``python scripts/replicate_mini_report.py RUN_DIR OUT_DIR``).

Claims (LongRoPE2, arXiv 2502.20082), checked in direction on the held-out book, every seed:

(i)  mixed context window training keeps the short-window PPL closer to the base model's than
     long-only training: |ln(PPL_arm / PPL_base)| of ``longrope2_mixed`` < that of
     ``longrope2_long_only`` at W/2 and W;
(ii) LongRoPE2's factors beat YaRN's at the target after the same training: ``longrope2_mixed``
     has a lower book PPL and a lower needle PPL at the target than ``yarn_mixed``.

Uncertainty: every book-PPL cell is a mean over windows; the report gives a 95% bootstrap interval
of each cell (resampling windows) and of each claim's difference, so that a difference smaller
than its interval is not read as a result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ARMS = ("longrope2_mixed", "longrope2_long_only", "yarn_mixed")
BOOT = 2000


def per_sample_nll(eval_dir: Path) -> dict:
    """(task, rope label, length) -> list of (nll sum, token count) per sample, from results.jsonl."""
    out = defaultdict(list)
    for line in (eval_dir / "results.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "nll" in r:
            out[(r["task"], r["rope"], int(r["length"]))].append((r["nll"], r["count"]))
        elif "score" in r:  # generation tasks: exact match 0/1
            out[(r["task"], r["rope"], int(r["length"]))].append((float(r["score"]), 1))
    return out


def ppl(samples) -> float:
    nll = sum(s for s, _ in samples)
    count = sum(c for _, c in samples)
    return math.exp(nll / count)


def boot_log_ratio(a, b, rng) -> tuple[float, float, float]:
    """ln(PPL_a / PPL_b) and its 95% bootstrap interval (windows resampled independently)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    point = math.log(ppl(a) / ppl(b))
    draws = []
    for _ in range(BOOT):
        ia = rng.integers(len(a), size=len(a))
        ib = rng.integers(len(b), size=len(b))
        draws.append(math.log(ppl(a[ia]) / ppl(b[ib])))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def main(run_dir: str, out_dir: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = per_sample_nll(run / "eval" / "base")
    runs = sorted(p.name for p in (run / "eval").iterdir() if p.is_dir() and p.name != "base")
    seeds = sorted({name.rsplit("-seed", 1)[1] for name in runs if "-seed" in name}) or [""]
    trained = {name: per_sample_nll(run / "eval" / name) for name in runs}
    window = json.loads((run / "search" / "best.json").read_text())["original_length"]
    target = json.loads((run / "search" / "best.json").read_text())["target_length"]
    best = json.loads((run / "search" / "best.json").read_text())

    def cell(data, task, rope, n):
        return data.get((task, rope, n))

    lengths = sorted({n for (task, _, n) in base if task == "book_ppl"})
    rows = [("base (original RoPE)", base, "original"), ("base + YaRN factors, no training", base, "yarn"),
            ("base + LongRoPE2 factors, no training", base, "longrope2")]
    rows += [(name, trained[name], "checkpoint") for name in runs]
    lines = ["# Miniature LongRoPE2 replication: results", "",
             f"Held-out book: Persuasion. Window W = {window}, target {target} ({target // window}x). "
             f"Searched: d_rcd = {best['critical_dim']} (d_tcd = {best['theoretical_critical_dim']}, "
             f"d10 = {best['ten_period_dim']}).", ""]
    seconds = os.environ.get("REPLICATION_SECONDS")
    if seconds:
        lines += [f"Wall time of `bash scripts/replicate_mini.sh` for this run: {int(seconds) // 60} min "
                  f"{int(seconds) % 60} s (every stage, both seeds; a rerun that skipped finished stages is "
                  "shorter).", ""]

    def table(task: str, title: str, fmt, ns):
        out_lines = [f"## {title}", "", "| model | " + " | ".join(str(n) for n in ns) + " |",
                     "| --- |" + " --- |" * len(ns)]
        for label, data, rope in rows:
            cells = []
            for n in ns:
                s = cell(data, task, rope, n)
                cells.append(fmt(s) if s else "")
            out_lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return out_lines + [""]

    def ppl_fmt(samples):
        a = np.asarray(samples, float)
        draws = [ppl(a[rng.integers(len(a), size=len(a))]) for _ in range(400)]
        lo, hi = np.percentile(draws, [2.5, 97.5])
        return f"{ppl(samples):.2f} [{lo:.1f}, {hi:.1f}]"

    def acc_fmt(samples):
        k = sum(s for s, _ in samples)
        return f"{100 * k / len(samples):.0f}% ({int(k)}/{len(samples)})"

    lines += table("book_ppl", "Book PPL on the held-out book (last 64 tokens of each window; 95% bootstrap interval)",
                   ppl_fmt, lengths)
    needle_lengths = sorted({n for (task, _, n) in base if task == "needle_ppl"})
    lines += table("needle_ppl", "Needle-driven PPL (answer tokens; needle right after the instruction)", ppl_fmt,
                   needle_lengths)
    for task, title in (("needle", "Needle retrieval by greedy decoding (exact 7-digit match, random depth)"),
                        ("passkey", "Passkey retrieval (exact match)")):
        ns = sorted({n for (t, _, n) in base if t == task})
        if ns:
            lines += table(task, title, acc_fmt, ns)

    # --- the claims ---------------------------------------------------------------------------------
    verdicts = []
    lines += ["## The paper's claims, in direction", ""]
    claim1 = []
    for seed in seeds:
        suffix = f"-seed{seed}" if seed else ""
        mixed, long_only = trained.get(f"longrope2_mixed{suffix}"), trained.get(f"longrope2_long_only{suffix}")
        if mixed is None or long_only is None:
            continue
        for n in (window // 2, window):
            b = cell(base, "book_ppl", "original", n)
            m = cell(mixed, "book_ppl", "checkpoint", n)
            lo_ = cell(long_only, "book_ppl", "checkpoint", n)
            dm, dl = abs(math.log(ppl(m) / ppl(b))), abs(math.log(ppl(lo_) / ppl(b)))
            diff = boot_log_ratio(lo_, m, rng)
            # direction, and whether the 95% interval of the log ratio excludes 0 in that direction
            claim1.append((dm < dl, diff[1] > 0))
            lines.append(f"- (i) seed {seed or '-'}, {n} tokens: base {ppl(b):.2f}, mixed {ppl(m):.2f} "
                         f"({100 * (ppl(m) / ppl(b) - 1):+.1f}%), long-only {ppl(lo_):.2f} "
                         f"({100 * (ppl(lo_) / ppl(b) - 1):+.1f}%); ln(long-only / mixed) = {diff[0]:+.3f} "
                         f"[{diff[1]:+.3f}, {diff[2]:+.3f}] -> mixed {'closer' if dm < dl else 'not closer'} to the base")
    claim2 = []
    for seed in seeds:
        suffix = f"-seed{seed}" if seed else ""
        ours, yarn = trained.get(f"longrope2_mixed{suffix}"), trained.get(f"yarn_mixed{suffix}")
        if ours is None or yarn is None:
            continue
        for task in ("book_ppl", "needle_ppl"):
            a, b = cell(ours, task, "checkpoint", target), cell(yarn, task, "checkpoint", target)
            diff = boot_log_ratio(b, a, rng)
            claim2.append((ppl(a) < ppl(b), diff[1] > 0))
            lines.append(f"- (ii) seed {seed or '-'}, {task} at {target}: LongRoPE2 {ppl(a):.3f}, YaRN {ppl(b):.3f}; "
                         f"ln(YaRN / LongRoPE2) = {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}] -> "
                         f"{'LongRoPE2 better' if ppl(a) < ppl(b) else 'LongRoPE2 not better'}")

    def verdict(results):
        if not results:
            return "not measured"
        n, direction, significant = len(results), sum(d for d, _ in results), sum(s for _, s in results)
        word = "holds" if direction == n else "does not hold" if direction == 0 else "mixed"
        return (f"{word} in direction ({direction}/{n} comparisons); the 95% bootstrap interval excludes "
                f"no difference in {significant}/{n}")

    verdicts = {"mixed_keeps_short_ppl": verdict(claim1), "longrope2_beats_yarn_at_target": verdict(claim2)}
    lines += ["", f"**(i) mixed context window keeps the short-window PPL closer to the base than long-only: "
                  f"{verdicts['mixed_keeps_short_ppl']}.**",
              f"**(ii) LongRoPE2 factors beat YaRN at the target after the same training: "
              f"{verdicts['longrope2_beats_yarn_at_target']}.**", ""]

    # --- plots --------------------------------------------------------------------------------------
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"base": "k", "longrope2_mixed": "C0", "longrope2_long_only": "C1", "yarn_mixed": "C2"}
    for label, data, rope in rows:
        ns = [n for n in lengths if cell(data, "book_ppl", rope, n)]
        values = [ppl(cell(data, "book_ppl", rope, n)) for n in ns]
        arm = label.rsplit("-seed", 1)[0]
        if label.startswith("base"):
            style = {"original": "-", "yarn": ":", "longrope2": "--"}[rope]
            left.plot(ns, values, style, color="k", marker="o", label=label)
        else:
            style = "-" if label.endswith("seed1") or "-seed" not in label else "--"
            left.plot(ns, values, style, color=colors.get(arm, "C5"), marker="o", label=label)
    left.axvline(window, color="gray", ls=":", lw=1)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("context length (tokens); dotted line: the pre-training window")
    left.set_ylabel("book PPL, held-out book")
    left.set_title("PPL vs context length")
    left.legend(fontsize=7)
    pre = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    right.plot([m["step"] for m in pre], [m["loss"] for m in pre], "k-", label="pre-training (W = 256)")
    right.set_xlabel("pre-training step")
    right.set_ylabel("training loss")
    right.set_title("loss curves")
    ax2 = right.twiny()
    for name in runs:
        metrics = [json.loads(x) for x in (run / "train" / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        arm = name.rsplit("-seed", 1)[0]
        ax2.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], "-" if name.endswith("seed1") else "--",
                 color=colors.get(arm, "C5"), alpha=0.8, label=name)
    ax2.set_xlabel("mid-training step (coloured)")
    right.legend(loc="upper right", fontsize=7)
    ax2.legend(loc="center right", fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "replication.png", dpi=110)
    plt.close(fig)

    lines += ["![PPL vs length and loss curves](replication.png)", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=1))
    # the raw outputs worth keeping (small): every eval summary and report, the search, the metrics
    for name in ["base", *runs]:
        for f in ("summary.json", "report.md", "results.jsonl"):
            src = run / "eval" / name / f
            if src.is_file():
                (out / "eval" / name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out / "eval" / name / f)
    for f in ("best.json", "comparison.md", "history.csv", "search.png"):
        if (run / "search" / f).is_file():
            (out / "search").mkdir(exist_ok=True)
            shutil.copy2(run / "search" / f, out / "search" / f)
    for name in ["pretrain", *(f"train/{r}" for r in runs)]:
        src = run / name / "metrics.jsonl"
        if src.is_file():
            (out / name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / name / "metrics.jsonl")
    for f in ("report.md", "comparison.json", "comparison.png"):
        if (run / "eval" / f).is_file():
            shutil.copy2(run / "eval" / f, out / f"pipeline_{f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
