"""``longrope2 <verb>``: the command-line entry point.

Verbs that need many processes (train, search) are launched with torchrun through the scripts
in ``launch/``; the verbs here run in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import yaml

from longrope2.rope.scaling import RopeGeometry
from longrope2.train.plan import add_dry_run_args


# What a user's input can raise (configs, files, flags): one line and exit status 2, not a
# traceback. LONGROPE2_TRACEBACK=1 shows the traceback instead, for a bug report.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
                PermissionError, yaml.YAMLError)


def describe_input_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


class CLIParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def resolve_geometry(args: argparse.Namespace) -> tuple[str, RopeGeometry]:
    """A model's RoPE from a preset name, a YAML/HF config file or folder, or explicit flags."""
    explicit = (args.head_dim, args.rope_base, args.original_length)
    if args.model is None:
        if None in explicit:
            raise ValueError("give a model (preset name, config.yaml, HF config.json or folder) or all of "
                             "--head-dim, --rope-base and --original-length")
        return "custom", RopeGeometry(args.head_dim, args.rope_base, args.original_length, args.rotary_percent)
    if any(v is not None for v in explicit):
        raise ValueError("give either a model or --head-dim/--rope-base/--original-length, not both")
    from longrope2.model.config import ModelConfig

    path = Path(args.model)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        try:
            hf_config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error})") from None
        return path.parent.name or path.stem, RopeGeometry.from_hf_config(hf_config)
    if path.suffix in (".yaml", ".yml"):
        model = ModelConfig.from_yaml(path)
    else:
        model = ModelConfig.from_name(args.model)
    return model.name, model.rope_geometry


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name (configs/models), config YAML, HF config.json or folder")
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--rope-base", type=float)
    parser.add_argument("--original-length", type=int, help="pre-training window L_train")
    parser.add_argument("--rotary-percent", type=float, default=1.0, help="fraction of each head rotated")
    parser.add_argument("--target-length", type=int, required=True)


def cmd_inspect(args: argparse.Namespace) -> int:
    from longrope2.rope.report import RopeReport

    name, geometry = resolve_geometry(args)
    report = RopeReport(name, geometry, args.target_length)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1)
        print()
    else:
        report.print_table()
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        report.plot(args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_factors(args: argparse.Namespace) -> int:
    from longrope2.rope.scaling import RopeScaling

    _, geometry = resolve_geometry(args)
    params = {}
    if args.method == "longrope2":
        if args.critical_dim is None or args.upper_factors is None:
            raise ValueError("--method longrope2 needs --critical-dim and --upper-factors (a JSON list or file)")
        params = {"critical_dim": args.critical_dim, "upper_factors": _json_list(args.upper_factors)}
    elif args.critical_dim is not None or args.upper_factors is not None:
        raise ValueError("--critical-dim/--upper-factors only apply to --method longrope2")
    scaling = RopeScaling.from_method(args.method, geometry, args.target_length, args.attention_factor, **params)
    if args.format == "hf":
        out = scaling.to_hf_config(args.style)
    else:
        out = {"method": args.method, "long_factor": list(scaling.long_factor),
               "attention_factor": scaling.resolved_attention_factor}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """One process, or one rank under torchrun (launch/search.py)."""
    if args.dry_run:
        from longrope2.train.plan import dry_run

        return dry_run("search", args)
    from longrope2.search.run import SearchConfig, run_search

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    if args.checkpoint:
        overrides["checkpoint"] = args.checkpoint
    config = SearchConfig.from_yaml(args.config, overrides)
    result = run_search(config, resume=args.resume)
    if result is not None:
        summary = {"critical_dim": result["critical_dim"]}
        if result["heldout"] is not None:
            summary["heldout_needle_ppl"] = result["heldout"]["needle_ppl"]
        summary.update({"search_needle_ppl": result["needle_ppl"], "baselines_search_needle_ppl":
                        result["baselines_needle_ppl"], "evaluations": result["evaluations"]})
        print(json.dumps(summary, indent=1))
        print(f"results in {config.output_dir}", file=sys.stderr)
    return 0


def _prepare_mix(args: argparse.Namespace) -> int:
    from longrope2.data.mix import MANIFEST as MANIFEST_NAME, MixConfig, run_mix

    config = MixConfig.from_yaml(args.config)
    manifest = run_mix(config, workers=args.workers, shard_index=args.shard_index, num_shards=args.num_shards)
    if manifest is None:
        print(f"{config.output}: this task's shards are done; the merge waits for the other tasks' shards")
        return 0
    for name, bucket in manifest["buckets"].items():
        budget = "all" if bucket["budget"] is None else f"{bucket['budget']:,}"
        print(f"{config.output}/{name}.bin/.idx: {bucket['documents']:,} documents, {bucket['tokens']:,} tokens "
              f"(budget {budget}; {bucket['min_tokens']:,}..{bucket['max_tokens']:,} tokens each)")
    print(f"{config.output}/{MANIFEST_NAME}: {manifest['tokens']:,} tokens, short fraction "
          f"{manifest['short_fraction']:.3f} (documents <= {manifest['window']:,} tokens)")
    for name, missing in manifest["shortfall"].items():
        print(f"warning: {name}: the inputs fell {missing:,} tokens short of the budget", file=sys.stderr)
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """Tokenize corpora (default: the embedded books) into a megatron indexed dataset, or a
    data-mix config into length buckets."""
    from longrope2.data.prepare import PrepareConfig, run_prepare

    if args.config:
        if args.inputs or args.output or args.tokenizer:
            raise ValueError("prepare-data --config takes its inputs, output and tokenizer from the config")
        return _prepare_mix(args)
    if not (args.output and args.tokenizer):
        raise ValueError("prepare-data needs --output and --tokenizer (or --config MIX.yaml)")

    config = PrepareConfig(output=args.output, tokenizer=args.tokenizer, inputs=list(args.inputs),
                           train_tokenizer=args.train_tokenizer, min_doc_tokens=args.min_doc_tokens,
                           max_doc_tokens=args.max_doc_tokens, needle_fraction=args.needle_fraction,
                           text_field=args.text_field, seed=args.seed)
    stats, vocab, name = run_prepare(config)
    needles = f", {stats.needle_documents:,} needle documents" if config.needle_fraction else ""
    print(f"{stats.prefix}.bin/.idx: {stats.documents:,} documents, {stats.tokens:,} tokens "
          f"from {stats.sources} sources ({name}, vocab {vocab}){needles}")
    if args.window:
        short, short_tokens, long, long_tokens = stats.short_long(args.window)
        print(f"  <= {args.window} tokens (short): {short:,} documents, {short_tokens:,} tokens; "
              f"longer: {long:,} documents, {long_tokens:,} tokens")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """One rank of mixed context window training (run it under torchrun, as launch/train.py)."""
    if args.dry_run:
        from longrope2.train.plan import dry_run

        return dry_run("train", args)
    from longrope2.train.trainer import main as train_main

    return train_main(["--config", args.config])


def cmd_convert(args: argparse.Namespace) -> int:
    """HF <-> megatron distributed checkpoints (one process, or under torchrun with --tp/--pp)."""
    from longrope2.model.convert import run_convert

    return run_convert(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """Long-context eval of one model under several rope configs (resumes in output_dir)."""
    from longrope2.eval.config import EvalConfig
    from longrope2.eval.run import run_eval

    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("model", args.model)) if v}
    if args.ropes:
        overrides["ropes"] = args.ropes.split(",")
    if args.lengths:
        try:
            overrides["lengths"] = [int(n) for n in args.lengths.split(",")]
        except ValueError:
            raise ValueError(f"--lengths must be comma-separated token counts (e.g. 4096,8192), got {args.lengths!r}") from None
    config = EvalConfig.from_yaml(args.config, overrides)
    summary = run_eval(config)
    print(f"report: {Path(config.output_dir) / 'report.md'} ({len(summary['metrics'])} metrics)", file=sys.stderr)
    return 0


def _json_list(text: str) -> list[float]:
    """--upper-factors: a JSON list, or a file holding one (or a search result with factors)."""
    path = Path(text)
    try:
        raw = json.loads(path.read_text()) if path.is_file() else json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--upper-factors {text!r} is neither a JSON list nor a JSON file of factors ({error})") from None
    if isinstance(raw, dict):  # a search result file
        raw = raw.get("upper_factors", raw.get("long_factor"))
    if not isinstance(raw, list) or not all(isinstance(x, (int, float)) for x in raw):
        raise ValueError(f"--upper-factors {text!r}: expected a JSON list of factors (numbers)")
    return [float(x) for x in raw]


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(prog="longrope2", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    inspect = verbs.add_parser("inspect", help="RoPE periods, critical dims and each family's factors")
    _add_model_args(inspect)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--plot", metavar="FILE.png", help="periods vs window and factor curves")
    inspect.set_defaults(func=cmd_inspect)

    factors = verbs.add_parser("factors", help="print a rope config for a method (HF longrope format)")
    _add_model_args(factors)
    factors.add_argument("--method", required=True, choices=["pi", "ntk", "yarn", "longrope2"])
    factors.add_argument("--critical-dim", type=int, help="longrope2: the real critical dim d_rcd")
    factors.add_argument("--upper-factors", help="longrope2: searched factors of pairs >= d_rcd (JSON list or file)")
    factors.add_argument("--attention-factor", type=float, help="cos/sin scale (default: the method's own)")
    factors.add_argument("--format", choices=["hf", "json"], default="hf")
    factors.add_argument("--style", choices=["rope_parameters", "rope_scaling"], default="rope_parameters",
                         help="transformers >= 5 (rope_parameters) or legacy (rope_scaling)")
    factors.set_defaults(func=cmd_factors)

    search = verbs.add_parser("search", help="needle-driven evolutionary search of LongRoPE2 factors")
    search.add_argument("--config", required=True, help="search YAML (configs/search/)")
    search.add_argument("--output-dir", help="override the config's output_dir")
    search.add_argument("--checkpoint", help="override the config's checkpoint (HF folder, .gguf, smollm2)")
    search.add_argument("--resume", action="store_true", help="continue the search in output_dir")
    add_dry_run_args(search, search=True)
    search.set_defaults(func=cmd_search)

    prepare = verbs.add_parser("prepare-data", help="tokenize text/JSONL/parquet (default: the embedded books) "
                                                    "into a megatron indexed dataset (.bin/.idx)")
    prepare.add_argument("inputs", nargs="*", help=".txt books, .jsonl/.parquet records with a text field, folders, "
                         "or embedded:NAME (one embedded book, e.g. embedded:emma)")
    prepare.add_argument("--config", help="a data-mix YAML (configs/data/): length buckets with token budgets "
                         "per source, into one dataset per bucket and a manifest (instead of inputs/--output)")
    prepare.add_argument("--workers", type=int, default=1, help="--config: tokenizing processes (default 1)")
    prepare.add_argument("--shard-index", type=int, default=0, help="--config: this task's share of the shards "
                         "(k %% --num-shards == --shard-index), e.g. $SLURM_ARRAY_TASK_ID")
    prepare.add_argument("--num-shards", type=int, default=1, help="--config: tasks sharing the work")
    prepare.add_argument("--output", help="dataset prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    prepare.add_argument("--tokenizer", help="hashed-words:VOCAB, smollm2, or an HF tokenizer path/.gguf "
                         "(with --train-tokenizer: the folder to write)")
    prepare.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="first train a sentencepiece BPE "
                         "tokenizer of VOCAB pieces on the inputs, into the --tokenizer folder (reused if present)")
    prepare.add_argument("--needle-fraction", type=float, default=0.0, help="rewrite this fraction of documents as "
                         "needle documents of the same length (a retrieval skill for models trained from scratch)")
    prepare.add_argument("--min-doc-tokens", type=int, default=64, help="books are cut into documents of log-uniform "
                         "lengths between these two")
    prepare.add_argument("--max-doc-tokens", type=int, default=32768)
    prepare.add_argument("--text-field", default="text")
    prepare.add_argument("--window", type=int, help="also count documents <= this original window (short) and longer")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.set_defaults(func=cmd_prepare_data)

    train = verbs.add_parser("train", help="mixed context window training (under torchrun; see launch/train.py)")
    train.add_argument("--config", required=True, help="run YAML (configs/*.yaml)")
    add_dry_run_args(train)
    train.set_defaults(func=cmd_train)

    convert = verbs.add_parser("convert", help="HF <-> megatron distributed checkpoints, streamed tensor by tensor "
                                               "(torchrun with --tp/--pp: each rank reads/writes its shard)")
    actions = convert.add_subparsers(dest="action", required=True)
    to_mcore = actions.add_parser("import-hf", help="HF folder, .gguf or smollm2 -> megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF folder (safetensors + config.json), a .gguf, or smollm2")
    to_mcore.add_argument("--output", required=True, help="checkpoint folder (usable as a train config's `load:`)")
    to_mcore.add_argument("--model", help="preset / model YAML / HF folder the source must match")
    to_hf = actions.add_parser("export-hf", help="megatron dist checkpoint -> HF folder with the longrope config")
    to_hf.add_argument("--checkpoint", required=True, help="dist checkpoint folder, or a training output_dir")
    to_hf.add_argument("--output", required=True, help="HF folder to write (must be empty or absent)")
    to_hf.add_argument("--model", help="preset / model YAML / HF folder (default: the checkpoint's hf/ from import-hf)")
    to_hf.add_argument("--rope", help="best.json, rope_config.json, a JSON factor list or a train config YAML")
    to_hf.add_argument("--target-length", type=int, help="L_target, when --rope does not say it")
    to_hf.add_argument("--attention-factor", type=float, help="cos/sin scale (default: the file's or HF's)")
    to_hf.add_argument("--rope-style", choices=["rope_parameters", "rope_scaling"], default="rope_parameters",
                       help="transformers >= 5 (rope_parameters) or legacy / vLLM (rope_scaling)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (5GB, 500MB, ...)")
    to_hf.add_argument("--tokenizer", help="HF tokenizer folder to copy into the output (default: the --model "
                       "folder's or the checkpoint's hf/)")
    for sub in (to_mcore, to_hf):
        sub.add_argument("--tp", type=int, default=1, help="tensor parallel size (world size = tp x pp)")
        sub.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
        sub.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                         help="weights dtype (auto: the source's)")
    convert.set_defaults(func=cmd_convert)

    evaluate = verbs.add_parser("eval", help="needle/book PPL, passkey, needle-in-a-haystack, RULER-style tasks and "
                                             "short-context retention under several rope configs")
    evaluate.add_argument("--config", required=True, help="eval YAML (configs/eval/)")
    evaluate.add_argument("--output-dir", help="override the config's output_dir (a rerun resumes there)")
    evaluate.add_argument("--model", help="override the model (HF folder, .gguf, smollm2, megatron checkpoint)")
    evaluate.add_argument("--ropes", help="comma-separated rope specs, e.g. original,yarn,longrope2=best.json")
    evaluate.add_argument("--lengths", help="comma-separated context lengths")
    evaluate.set_defaults(func=cmd_eval)
    pipeline = verbs.add_parser("pipeline", add_help=False,
                                help="the whole method from one YAML: prepare, import|pretrain, search, train, "
                                     "export, eval (see `longrope2 pipeline --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `longrope2 ... | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = argv[0] if argv else ""
    try:
        if verb == "pipeline":  # its own parser (longrope2/pipeline.py), flags passed through
            from longrope2.pipeline import main as pipeline_main

            return pipeline_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except INPUT_ERRORS as error:
        if os.environ.get("LONGROPE2_TRACEBACK"):
            raise
        print(f"longrope2 {verb}: error: {describe_input_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
