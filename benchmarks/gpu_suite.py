"""The GPU path measured in one prepared run: numerics, training tokens/s and MFU, memory vs the
dry run, the dual-cache rotary's overhead, and the search scorer (with the 128k search cost).

Sections (each through the project's own code; ``gpu_suite_measure.py``, ``gpu_suite_numerics.py``):

* ``environment``, ``calibration``: versions, device, attention backend; the bf16 matrix-product
  ceiling on random data (the MFU denominator is the datasheet peak, this is for comparison);
* ``numerics``: a small LLaMA built by ``build_gpt_model`` in bf16 (and fp32) on this device vs
  the fp32 CPU reference (a subprocess with CUDA hidden): logits, loss and grads for a long
  micro-batch (past the window: the long factors) and a packed THD one, with stated tolerances;
  the attention ops/kernels the profiler saw;
* ``rotary_angles``: the dual-cache rotary's angles at positions 0..131,071 (LLaMA3-8B, long
  factors) vs transformers' ``longrope`` frequencies in fp32 and vs exact fp64 angles;
* ``training``: ``Trainer.train_step`` on a ~1B LLaMA (TinyLlama-1.1B's shape) at 16k and 32k,
  all-long vs all-packed micro-batches at the same tokens per step: tokens/s, MFU with causal
  attention FLOPs (``ModelConfig.flops_per_token``, per packed document), peak memory next to
  ``--dry-run``'s estimate (``train/plan.py``) for the same config;
* ``rotary_overhead``: ``benchmarks/rotary_overhead.py``'s step-time ratio, dual-cache vs stock;
* ``scorer``, ``search_cost``: ``NeedleScorer.score`` seconds and peak memory per candidate on
  SmolLM2-135M's architecture at 32k and 64k, and the LLaMA3-8B 128k search extrapolated to 64 GPUs.

A failed section is recorded with its error and the suite goes on; a global time budget
(``--budget-s``, SIGALRM) interrupts the running section and skips the rest; ``gpu_suite.json``
and ``gpu_suite.md`` are rewritten after every measurement, so a kill loses only the one in
flight. Exit status 0 when every section passed, 1 otherwise, 2 on bad arguments.

    bash benchmarks/gpu_suite.sh --prepare   # here: carried wheel + books into .gpu_carry/
    bash benchmarks/gpu_suite.sh             # on the GPU machine (device tool, carry .gpu_carry)
    OMP_NUM_THREADS=1 python benchmarks/gpu_suite.py --smoke --out /tmp/suite   # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

STARTED = time.monotonic()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout, when the project is not installed (GPU machine)

PROFILES = {
    # one H200 (139 GiB), ~8 minutes in all
    "gpu": dict(matmul_n=8192,
                numerics_model="small_llama", numerics_init_std=0.03, numerics_seq=8192,
                numerics_dtypes=["bfloat16", "float32"], angles_length=131072,
                train_model="tinyllama_1b", train_lengths=[16384, 32768], tokens_per_step=65536, train_warmup=2,
                train_steps=4, train_dtype="bfloat16", doc_tokens=[512, 32768],
                rotary_model="tinyllama_1b", rotary_length=16384, rotary_steps=10, rotary_warmup=3,
                scorer_model="smollm2_135m", scorer_lengths=[32768, 65536], scorer_documents=2, scorer_candidates=2,
                scorer_dtypes=["bfloat16", "float32"], budget_s=450.0, peak_tflops=989.0),
    # the same code paths on the CPU in seconds (tests/test_gpu_suite.py)
    "smoke": dict(matmul_n=256,
                  numerics_model="tiny", numerics_init_std=0.1, numerics_seq=1024,
                  numerics_dtypes=["bfloat16", "float32"], angles_length=131072,
                  train_model="tiny", train_lengths=[512, 1024], tokens_per_step=2048, train_warmup=1,
                  train_steps=2, train_dtype="float32", doc_tokens=[32, 2048],
                  rotary_model="tiny", rotary_length=512, rotary_steps=2, rotary_warmup=1,
                  scorer_model="tiny", scorer_lengths=[512, 1024], scorer_documents=2, scorer_candidates=2,
                  scorer_dtypes=["float32"], budget_s=300.0, peak_tflops=None),
}
"""``peak_tflops`` is the MFU denominator: 989 = H100/H200 SXM dense bf16 (datasheet); None = the
calibration's measured rate (CPU)."""

MULTI_TASK = {"training"}
"""Sections of several tasks (one per run, each with its own status under ``runs``)."""
SECTIONS = ["environment", "calibration", "numerics", "rotary_angles", "training", "scorer", "search_cost",
            "rotary_overhead"]


class BudgetExceeded(BaseException):
    """Raised by SIGALRM at the deadline (a BaseException: library code's ``except Exception``
    must not swallow it)."""


class Terminated(BaseException):
    """SIGTERM (the wrapper's timeout): stop, keeping what was written."""


class Context:
    """What sections see: sizes, device, work folder, the deadline, and ``partial`` to save."""

    def __init__(self, suite: "Suite", sizes: dict, profile_name: str, work: Path):
        self.suite, self.sizes, self.profile_name, self.work = suite, sizes, profile_name, work
        self._entry = None

    @property
    def device(self):
        import torch

        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def remaining(self) -> float:
        return self.suite.deadline - time.monotonic()

    def partial(self, result: dict) -> None:
        """Save a section's results so far (status stays ``running``)."""
        self._entry.update(result)
        self.suite.write()

    def calibration_tflops(self) -> float | None:
        entry = self.suite.results["sections"].get("calibration", {})
        return entry.get("tflops") if entry.get("status") == "ok" else None

    def peak_tflops(self) -> float:
        if self.sizes["peak_tflops"] is not None:
            return float(self.sizes["peak_tflops"])
        measured = self.calibration_tflops()
        if measured is None:
            raise RuntimeError("no peak_tflops for MFU: the profile uses the calibration's rate and calibration failed")
        return measured


class Suite:
    def __init__(self, out: Path, budget_s: float, sizes: dict, profile_name: str, argv: list[str]):
        self.out, self.deadline = out, STARTED + budget_s
        self.results = {"suite": {"profile": profile_name, "budget_s": budget_s, "argv": argv, "sizes": sizes,
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "elapsed_s": 0.0},
                        "sections": {}}

    def write(self) -> None:
        """gpu_suite.json and gpu_suite.md, each replaced atomically."""
        self.results["suite"]["elapsed_s"] = time.monotonic() - STARTED
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_suite.json", json.dumps(self.results, indent=1, default=str, allow_nan=True)),
                           ("gpu_suite.md", render_markdown(self.results))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def entry(self, section: str, key: str | None, keep: bool = False) -> dict:
        """A fresh entry for a task (``keep``: the existing one, if any)."""
        sections = self.results["sections"]
        if key is None:
            if not (keep and section in sections):
                sections[section] = {"status": "running"}
            return sections[section]
        runs = sections.setdefault(section, {"status": "running", "runs": {}})["runs"]
        if not (keep and key in runs):
            runs[key] = {"status": "running"}
        return runs[key]

    def finish_section(self, section: str) -> None:
        """A section of several runs is ok when all are, else the first non-ok status."""
        data = self.results["sections"].get(section)
        if section in MULTI_TASK and data is not None:
            statuses = [r["status"] for r in data["runs"].values()]
            data["status"] = "ok" if all(s == "ok" for s in statuses) else next(s for s in statuses if s != "ok")


def run_tasks(suite: Suite, ctx: Context, tasks: list) -> None:
    """Run ``(section, key, fn)`` tasks in order, each isolated: an error is recorded and the next
    one runs; at the deadline (or on SIGTERM) the running one is interrupted, the rest skipped."""
    stop = None
    for section, key, fn in tasks:
        try:
            stop = _run_task(suite, ctx, section, key, fn, stop)
        except (BudgetExceeded, Terminated) as signalled:  # arrived between the task and its bookkeeping
            stop = stop or _reason(signalled)
            entry = suite.entry(section, key, keep=True)
            if entry["status"] == "running":
                entry.update(status="interrupted", error=stop)
        suite.finish_section(section)
        suite.write()


def _reset_parallel() -> None:
    """Whatever a task left initialized; nothing to do (and nothing to import) if megatron never
    was (an import cut short by the alarm must not be retried here)."""
    if "megatron.core.parallel_state" in sys.modules:
        importlib.import_module("gpu_suite_measure").reset_parallel()


def _reason(signalled: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(signalled, Terminated) else "time budget exhausted"


def _run_task(suite: Suite, ctx: Context, section: str, key: str | None, fn, stop: str | None) -> str | None:
    entry = suite.entry(section, key)
    ctx._entry = entry
    if stop is None and ctx.remaining() <= 0:
        stop = "time budget exhausted"
    if stop is not None:
        entry.update(status="skipped", error=stop)
        return stop
    start = time.monotonic()
    print(f"[suite] {section}{'/' + key if key else ''} ({ctx.remaining():.0f} s of budget left)", flush=True)
    try:
        entry.update(fn())
        entry["status"] = "ok"
    except (BudgetExceeded, Terminated) as signalled:
        stop = _reason(signalled)
        entry.update(status="interrupted", error=f"{stop} during this section")
    except Exception as error:  # recorded; the suite goes on
        entry.update(status="error", error=f"{type(error).__name__}: {error}",
                     traceback=traceback.format_exc(limit=12)[-4000:])
        print(f"[suite] {section}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    finally:
        entry["seconds"] = time.monotonic() - start
        try:
            _reset_parallel()
        except BaseException as error:  # noqa: BLE001 - cleanup must not end the suite
            entry.setdefault("cleanup_error", f"{type(error).__name__}: {error}")
    return stop


def build_tasks(ctx: Context, sections: list[str]) -> list:
    """``(section, key, fn)`` in run order; nothing is imported until a task runs, so a budget
    that ends early still leaves every requested section in the report."""

    def measure(name, *args):
        return lambda: getattr(importlib.import_module("gpu_suite_measure"), name)(ctx, *args)

    def numerics(name):
        return lambda: getattr(importlib.import_module("gpu_suite_numerics"), name)(ctx)

    lengths = ctx.sizes["train_lengths"]
    training = {length: [("training", f"{length}/{kind}", measure("training", length, kind))
                         for kind in ("long", "packed")] for length in lengths}
    by_section = {
        "environment": [("environment", None, measure("environment"))],
        "calibration": [("calibration", None, measure("calibration"))],
        "numerics": [("numerics", None, numerics("numerics"))],
        "rotary_angles": [("rotary_angles", None, numerics("rotary_angles"))],
        "training": training[lengths[0]],
        "scorer": [("scorer", None, measure("scorer"))],
        "search_cost": [("search_cost", None, lambda: importlib.import_module("gpu_suite_measure").search_cost(
            ctx, ctx.suite.results["sections"].get("scorer")))],
        "rotary_overhead": [("rotary_overhead", None, measure("rotary_overhead"))],
    }
    tasks = [task for name in SECTIONS if name in sections for task in by_section[name]]
    if "training" in sections:  # the longer lengths last: 16k (the MFU goal) before the rest
        tasks += [task for length in lengths[1:] for task in training[length]]
    return tasks


# --- the report -----------------------------------------------------------------------------------


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.{digits - 1}e}"
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]


def render_markdown(results: dict) -> str:
    sections = results["sections"]
    suite = results["suite"]
    env = sections.get("environment", {})
    lines = [f"# GPU suite ({suite['profile']} profile): {env.get('device', '?')}", "",
             f"Started {suite['started']}, {suite['elapsed_s']:.0f} s of a {suite['budget_s']:.0f} s budget; "
             f"torch {env.get('torch', '?')}, megatron-core {env.get('megatron_core', '?')}, "
             f"attention: {env.get('core_attention', '?')}; commit {env.get('git_commit', '?')}.", "",
             "## Status", ""]
    rows = []
    for name, data in sections.items():
        runs = data.get("runs") if name in MULTI_TASK else None
        for key, entry in (runs or {None: data}).items():
            rows.append([name + (f" {key}" if key else ""), entry.get("status"), entry.get("seconds"),
                         (entry.get("error") or "")[:160]])
    lines += _table(["section", "status", "seconds", "error"], rows)

    cal = sections.get("calibration", {})
    if cal.get("tflops"):
        lines += ["", f"Matrix-product ceiling: {_f(cal['tflops'])} TFLOP/s ({cal['dtype']}, {cal['n']}^3, median "
                      "of 10 x 5 products on random data)."]

    num = sections.get("numerics", {})
    if num.get("runs"):
        lines += ["", "## Numerics vs the fp32 CPU reference", "",
                  f"{num['model']['name']}, {num['seq_length']} tokens (packed: {num.get('packed_documents')} "
                  f"documents, longest {num.get('packed_max_document')}); relative L2 errors, tolerance in brackets.", ""]
        rows = []
        for key, r in num["runs"].items():
            t = r["tolerances"]
            rows.append([key, f"{_f(r['logits_rel_l2'])} ({_f(t['logits_rel_l2'])})",
                         f"{_f(r['loss'], 6)} / {_f(r['loss_ref'], 6)}", f"{_f(r['loss_rel'])} ({_f(t['loss_rel'])})",
                         f"{_f(r['grads_rel_l2'])} ({_f(t['grads_rel_l2'])})", r["grads_cosine"],
                         r["within_tolerance"], ", ".join(r.get("attention_ops", []))[:200] or r.get("attention_ops_error")])
        lines += _table(["dtype/case", "logits", "loss ours / ref", "loss rel", "grads", "grad cosine", "within",
                         "attention ops / kernels"], rows)
        if num.get("sensitivity"):
            sens = num["sensitivity"]
            lines += ["", f"The check can fail: with the same weights, the packed documents run as one sequence move "
                          f"the logits by {_f(sens['packed_as_one_sequence'])} and the long micro-batch with the "
                          f"original RoPE by {_f(sens['long_with_the_original_rope'])} (relative L2, "
                          f"{_f(num['sensitivity_over_bf16_tolerance'])}x the bf16 bound at least); init std "
                          f"{num['model']['init_method_std']}."]

    ang = sections.get("rotary_angles", {})
    if "vs_fp64_max_rel" in ang:
        t = ang["tolerances"]
        lines += ["", f"## Rotary angles to position {ang['max_position']:,} ({ang['model']}, {ang['device']})", "",
                  *_table(["check", "value", "tolerance"], [
                      ["vs transformers fp32 (max ulp)", ang["vs_transformers_fp32_max_ulp"], t["vs_transformers_fp32_max_ulp"]],
                      ["vs fp64 (max relative)", ang["vs_fp64_max_rel"], t["vs_fp64_max_rel"]],
                      ["vs fp64 (max abs, rad)", ang["vs_fp64_max_abs_rad"], None],
                      ["cos vs fp64 (max abs)", ang["cos_vs_fp64_max_abs"], None],
                      ["fp32 spacing at the largest angle (rad)", ang["fp32_spacing_at_largest_angle_rad"], None],
                      ["short factors up to the window", ang["short_factors_at_window"], None],
                      ["long factors past the window", ang["long_factors_past_window"], None]])]

    train = sections.get("training", {}).get("runs", {})
    done = [r for r in train.values() if "step_s" in r]
    if done:
        lines += ["", "## Training throughput (Trainer.train_step, one device)", "",
                  f"{done[0]['model']}, {done[0]['dtype']}; MFU = causal FLOPs (per packed document) / step time / "
                  f"{_f(done[0]['peak_tflops'])} TFLOP/s; memory estimate = the dry run's total less its 3 GiB "
                  "CUDA/NCCL overhead.", ""]
        rows = [[f"{r['seq_length']:,} {r['kind']}", r["micro_batches_per_step"], r["tokens_per_step"], r["step_s"],
                 r["tokens_per_s"], f"{100 * r['mfu']:.1f}%",
                 f"{100 * r['mfu_trainer']:.1f}%" if r.get("mfu_trainer") is not None else "-",
                 r["causal_tflops"], r["peak_allocated_gib"], r["estimate_allocated_gib"], r["peak_over_estimate"],
                 r["loss_first"], r["loss_last"]] for r in done]
        lines += _table(["length / kind", "micro-batches", "tokens/step", "step s", "tokens/s", "MFU",
                         "MFU (trainer's)", "TFLOP/s", "peak GiB", "estimate GiB", "peak / estimate",
                         "loss first", "loss last"], rows)

    rot = sections.get("rotary_overhead", {})
    if "long" in rot:
        lines += ["", f"## Dual-cache rotary vs megatron's RotaryEmbedding ({rot['model']}, {rot['seq_length']:,} "
                      f"tokens, {rot['steps']} steps each, goal {rot.get('goal')})", "",
                  *_table(["micro-batch", "dual-cache ms", "stock ms", "ratio"],
                          [[k, 1e3 * rot[k]["dual_cache_s"], 1e3 * rot[k]["stock_s"], f"{rot[k]['ratio']:.4f}"]
                           for k in ("long", "short_packed") if k in rot])]

    sc = sections.get("scorer", {})
    if sc.get("runs"):
        lines += ["", f"## Needle scorer ({sc['model']}, {sc['documents_per_candidate']} documents per candidate; "
                      f"{sc['weights']})", "",
                  *_table(["dtype / length", "s per candidate", "s per document", "peak GiB", "forward TFLOP/s"],
                          [[k, r["s_per_candidate"], r["s_per_document"], r["peak_allocated_gib"], r["forward_tflops"]]
                           for k, r in sc["runs"].items()])]
    cost = sections.get("search_cost", {})
    if "gpu_hours" in cost:
        lines += ["", f"## Estimated search cost: LLaMA3-8B at {cost['length']:,} on {cost['gpus']} GPUs", "",
                  f"`{cost['formula']}`", "",
                  f"C = {cost['candidates']} candidates, D = {cost['documents']} documents, R = "
                  f"{_f(cost['rate_tflops'])} TFLOP/s (from {cost['source_run']}): {_f(cost['s_per_document'])} s per "
                  f"document, {_f(cost['s_per_candidate'])} s per candidate, **{_f(cost['wall_hours'])} h on "
                  f"{cost['gpus']} GPUs** ({_f(cost['gpu_hours'])} GPU-hours); dry-run memory per GPU "
                  f"{_f(cost['dry_run_memory_gib'])} GiB of {_f(cost['device_gib'])}; causal attention is "
                  f"{100 * cost['attention_share_source']:.0f}% of the measured model's forward and "
                  f"{100 * cost['attention_share_target']:.0f}% of LLaMA3-8B's. {cost['caveat']}."]
    return "\n".join(lines) + "\n"


# --- the command line -----------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds): the test's run")
    parser.add_argument("--out", default=os.environ.get("OUT") or "results/gpu_suite",
                        help="gpu_suite.json and gpu_suite.md go here (default: $OUT, else results/gpu_suite)")
    parser.add_argument("--work", help="scratch (data, configs, reference tensors); default: a temporary folder")
    parser.add_argument("--budget-s", type=float, help="stop cleanly after this many seconds (gpu 450, smoke 300)")
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a profile size, e.g. --set train_lengths=[16384] --set scorer_model=smollm2_135m")
    parser.add_argument("--numerics-reference", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.numerics_reference:  # the fp32 CPU reference worker (a subprocess of the numerics section)
        import gpu_suite_numerics

        return gpu_suite_numerics.numerics_reference(*args.numerics_reference)
    profile_name = "smoke" if args.smoke else "gpu"
    sizes = dict(PROFILES[profile_name])
    try:
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or key not in sizes:
                raise ValueError(f"--set {item!r}: expected KEY=JSON with KEY one of {sorted(sizes)}")
            sizes[key] = json.loads(value)
        sections = SECTIONS if not args.sections else [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown sections {unknown}; known: {SECTIONS}")
    except (ValueError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else sizes["budget_s"]

    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="longrope2-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(Path(args.out), budget, sizes, profile_name, argv)

    def on_alarm(signum, frame):
        raise BudgetExceeded()

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    left = suite.deadline - time.monotonic()
    if left > 0:
        signal.setitimer(signal.ITIMER_REAL, left)
    try:
        ctx = Context(suite, sizes, profile_name, work)
        tasks = build_tasks(ctx, sections)
        run_tasks(suite, ctx, tasks)
    except (BudgetExceeded, Terminated) as stop:  # between tasks, or while importing
        suite.results["suite"]["stopped"] = type(stop).__name__
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        suite.write()
        if not args.work:  # our own temporary folder (data, configs, reference tensors)
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    statuses = [data["status"] for data in suite.results["sections"].values()]
    print(render_markdown(suite.results), flush=True)
    print(f"[suite] wrote {suite.out / 'gpu_suite.json'} and gpu_suite.md ({time.monotonic() - STARTED:.0f} s)",
          flush=True)
    return 0 if statuses and all(s == "ok" for s in statuses) and len(statuses) == len(sections) else 1


if __name__ == "__main__":
    raise SystemExit(main())
