"""``longrope2 pipeline --config configs/pipeline/NAME.yaml``: the method end to end, stage by stage.

    prepare -> import | pretrain -> search -> train -> export -> eval

A thin orchestrator. Each stage is the existing entry point run on a config file that the
pipeline writes into the stage's folder (``<output_dir>/<stage>/.../config.yaml``), so any stage
can be re-run by hand; the stage sections of the pipeline YAML are the stage configs themselves
(``PrepareConfig``, ``TrainConfig``, ``SearchConfig``, ``EvalConfig``: the same dataclasses and
strict checks), minus the fields the pipeline wires:

* ``prepare.NAME``: ``prepare-data`` into ``prepare/NAME`` (``output`` is set; with
  ``train_tokenizer`` the tokenizer goes to ``prepare/tokenizer`` unless ``tokenizer`` says where);
  a data path ``prepare:NAME`` in a train section means that dataset;
* ``import``: ``convert import-hf`` of ``hf`` (an HF folder, a .gguf, ``smollm2``) into
  ``import/checkpoint``; the base model is ``hf`` itself;
* ``pretrain`` (instead of ``import``): ``launch/train.py`` from random weights at the original
  window (``rope: null``), then the result as an HF folder ``pretrain/hf`` (the base model);
* ``search``: ``launch/search.py`` on the base model into ``search/`` (``checkpoint`` is set);
* ``train``: ``launch/train.py`` from the base weights (``load``), with the search's ``best.json``
  unless the section names a ``rope``, into ``train/RUN``. ``arms`` (name -> overrides of the
  train section) and ``seeds`` (each sets ``seed`` and ``data.seed``) make several runs;
* ``export``: ``convert export-hf`` of each run with its rope into ``export/RUN``;
* ``eval``: ``longrope2 eval`` of the base model under ``eval.ropes`` (``search`` = the searched
  factors) and of every exported run under its own rope, into ``eval/base`` and ``eval/RUN``,
  then ``eval/report.md`` + ``eval/comparison.png`` over all of them.

A finished stage (its outputs complete, a ``.done`` marker holding its config's hash) is skipped;
an interrupted one resumes (the trainer from its checkpoint, the search with ``--resume``, eval
from its results). ``--from STAGE`` removes that stage's outputs and every later stage's and
runs them again; ``--only STAGE`` runs one stage; ``--dry-run`` prints every stage's plan.

Distributed stages run under ``torchrun --nproc_per_node N`` on this machine, under srun
(``slurm/torchrun.sh``) inside a Slurm allocation, or in this process when the pipeline itself
runs under torchrun (every rank runs it; rank 0 runs the one-process stages, the others wait).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from longrope2 import configs

STAGES = ("prepare", "import", "pretrain", "search", "train", "export", "eval")
ROOT = Path(__file__).resolve().parents[1]
DONE = ".done"
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                 "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


class PipelineError(Exception):
    """A bad pipeline config or a stage that failed: one line for the user."""


@dataclass(kw_only=True)
class ImportSection:
    hf: str
    """HF folder (safetensors + config.json), a .gguf file, or ``smollm2``."""
    model: Optional[str] = None
    """Preset / model YAML the source must match (also the train runs' default ``model``)."""


@dataclass(kw_only=True)
class ExportSection:
    rope_style: str = "rope_parameters"
    """transformers >= 5 (``rope_parameters``) or legacy / vLLM (``rope_scaling``)."""
    dtype: str = "auto"
    searched_base: bool = False
    """Also export the base model with the searched factors, untrained, to ``export/base-longrope2``
    (what a search-only pipeline hands over)."""

    def __post_init__(self) -> None:
        if self.rope_style not in ("rope_parameters", "rope_scaling"):
            raise ValueError(f"export.rope_style must be rope_parameters or rope_scaling, got {self.rope_style!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"export.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass(kw_only=True)
class PipelineConfig:
    output_dir: str
    """Every stage writes into ``<output_dir>/<stage>/``."""
    nproc_per_node: int = 1
    """Ranks of the distributed stages (pretrain, search, train) when launched here."""
    master_port: int = 29541
    """Rendezvous port of those torchrun launches."""
    prepare: dict[str, dict] = field(default_factory=dict)
    """Dataset name -> ``PrepareConfig`` fields (without ``output``)."""
    import_: Optional[ImportSection] = None
    """YAML key ``import``."""
    pretrain: Optional[dict] = None
    """``TrainConfig`` fields without ``output_dir`` (``rope: null``)."""
    search: Optional[dict | str] = None
    """``SearchConfig`` fields without ``output_dir`` and ``checkpoint``, or a search YAML's path
    (its ``output_dir``, ``checkpoint`` and ``model`` are replaced by the pipeline's)."""
    train: Optional[dict] = None
    """``TrainConfig`` fields without ``output_dir`` and ``load``."""
    arms: dict[str, dict] = field(default_factory=dict)
    """Run name -> overrides merged into ``train`` (empty: one run, ``train``)."""
    seeds: list[int] = field(default_factory=list)
    """Each arm once per seed (``seed`` and ``data.seed``); empty: the section's own."""
    export: ExportSection = field(default_factory=ExportSection)
    eval: Optional[dict] = None
    """``EvalConfig`` fields without ``model`` and ``output_dir``; ``ropes`` are the base model's."""

    def __post_init__(self) -> None:
        if not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be a positive int, got {self.nproc_per_node!r}")
        if (self.import_ is None) == (self.pretrain is None) and (self.search or self.train or self.eval):
            raise ValueError("give exactly one of `import` (a pre-trained model) and `pretrain` (train one here)")
        if self.arms and self.train is None:
            raise ValueError("`arms` need a `train` section to override")
        if self.export_needed and self.train is None:
            raise ValueError("`eval` of trained runs needs a `train` section")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        for name in self.arms:
            if not name or "/" in name or name == "base":
                raise ValueError(f"arm name {name!r}: a non-empty folder name other than 'base'")

    @property
    def export_needed(self) -> bool:
        return self.eval is not None and self.train is not None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PipelineConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline config {path} not found")
        values = configs.parse_yaml(path) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of sections")
        if "import" in values:
            values["import_"] = values.pop("import")
        return configs.from_dict(cls, values, source=str(path))


# --- the stages' configs, wired -------------------------------------------------------------------


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _section(value: Any, owned: tuple[str, ...], where: str) -> Optional[dict]:
    """A stage section: a mapping, or the path of that stage's own YAML (``search:
    configs/search/x.yaml``), whose wired fields (``owned``) the pipeline replaces."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: a mapping of the stage's fields or the path of its YAML, got {value!r}")
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {path} not found")
    loaded = configs.parse_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{where}: {path} is not a mapping")
    return {k: v for k, v in loaded.items() if k not in owned}


def _owned(section: dict, fields: tuple[str, ...], where: str) -> None:
    given = [f for f in fields if f in section]
    if given:
        raise ValueError(f"{where}: the pipeline sets {', '.join(given)} itself; remove it from the section")


@dataclass
class Plan:
    """Every stage's config, resolved against ``output_dir`` (built once, checked up front)."""

    config: PipelineConfig
    out: Path
    prepare: dict[str, Any] = field(default_factory=dict)
    base_hf: Optional[str] = None
    base_checkpoint: Optional[Path] = None
    tokenizer: Optional[str] = None
    import_model: Optional[str] = None
    pretrain: Any = None
    search: Any = None
    runs: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    @property
    def stages(self) -> list[str]:
        present = {"prepare": bool(self.prepare), "import": self.config.import_ is not None,
                   "pretrain": self.pretrain is not None, "search": self.search is not None,
                   "train": bool(self.runs),
                   "export": (bool(self.runs) and bool(self.evals)) or self.config.export.searched_base,
                   "eval": bool(self.evals)}
        return [s for s in STAGES if present[s]]


def build_plan(config: PipelineConfig) -> Plan:
    """Resolve and check every stage config before any work (raises ValueError naming the field)."""
    from longrope2.data.prepare import PrepareConfig
    from longrope2.eval.config import EvalConfig
    from longrope2.search.run import SearchConfig
    from longrope2.train.config import TrainConfig

    out = Path(config.output_dir)
    plan = Plan(config, out)
    prep = out / "prepare"
    trainers = [name for name, section in config.prepare.items() if section.get("train_tokenizer") is not None]
    if len(trainers) > 1:
        raise ValueError(f"prepare: {', '.join(trainers)} each train a tokenizer; train it in one, the others share it")
    trained_tokenizer = config.prepare[trainers[0]].get("tokenizer", str(prep / "tokenizer")) if trainers else None
    # the dataset that trains the tokenizer goes first; the others use it unless they name their own
    for name in trainers + [n for n in config.prepare if n not in trainers]:
        section = config.prepare[name]
        _owned(section, ("output",), f"prepare.{name}")
        values = dict(section)
        if trained_tokenizer is not None:
            values.setdefault("tokenizer", trained_tokenizer)
        elif "tokenizer" not in values:
            raise ValueError(f"prepare.{name}: give `tokenizer` (or `train_tokenizer` to train one)")
        plan.prepare[name] = configs.from_dict(PrepareConfig, {**values, "output": str(prep / name)},
                                               f"prepare.{name}")
    plan.tokenizer = trained_tokenizer

    def data_paths(section: dict, where: str) -> dict:
        data = dict(section.get("data") or {})
        paths = []
        for p in data.get("paths") or []:
            if isinstance(p, str) and p.startswith("prepare:"):
                name = p[len("prepare:"):]
                if name not in plan.prepare:
                    raise ValueError(f"{where}.data.paths: {p}: no prepare.{name} section")
                p = str(prep / name)
            paths.append(p)
        data["paths"] = paths
        return {**section, "data": data}

    if config.import_ is not None:
        plan.base_hf = config.import_.hf
        plan.base_checkpoint = out / "import" / "checkpoint"
        plan.import_model = config.import_.model
    if config.pretrain is not None:
        _owned(config.pretrain, ("output_dir", "load"), "pretrain")
        plan.pretrain = configs.from_dict(
            TrainConfig, {**data_paths(config.pretrain, "pretrain"), "output_dir": str(out / "pretrain")}, "pretrain")
        if plan.pretrain.rope is not None:
            raise ValueError("pretrain.rope must be null: pre-training uses the original RoPE")
        plan.base_hf = str(out / "pretrain" / "hf")
        plan.base_checkpoint = out / "pretrain" / "checkpoints"
    search = _section(config.search, ("output_dir", "checkpoint", "model"), "search")
    if search is not None:
        _owned(search, ("output_dir", "checkpoint", "model"), "search")
        plan.search = configs.from_dict(
            SearchConfig, {**search, "output_dir": str(out / "search"), "checkpoint": plan.base_hf}, "search")
    if config.train is not None:
        _owned(config.train, ("output_dir", "load"), "train")
        arms = config.arms or {"train": {}}
        seeds = config.seeds or [None]
        for seed in seeds:  # every arm of the first seed first: a partial run has a comparison
            for arm, overrides in arms.items():
                _owned(overrides, ("output_dir", "load"), f"arms.{arm}")
                name = arm if seed is None or len(seeds) == 1 else f"{arm}-seed{seed}"
                section = _merge(config.train, overrides)
                if seed is not None:
                    section = _merge(section, {"seed": seed, "data": {"seed": seed}})
                section.setdefault("model", (plan.pretrain.model if plan.pretrain is not None else plan.import_model))
                if section.get("model") is None:
                    raise ValueError(f"train ({name}): give `model` (or import.model)")
                if "rope" not in section:
                    if plan.search is None:
                        raise ValueError(f"train ({name}): no `rope` and no search stage to take best.json from")
                    section["rope"] = {"factors": str(out / "search" / "best.json"),
                                       "target_length": plan.search.target_length}
                section = {**data_paths(section, f"train ({name})"), "output_dir": str(out / "train" / name),
                           "load": str(plan.base_checkpoint)}
                run = configs.from_dict(TrainConfig, section, f"train ({name})")
                if run.rope is None:
                    raise ValueError(f"train ({name}): rope null is pre-training; a train run needs rescaled factors")
                plan.runs[name] = run
    if config.export.searched_base and plan.search is None:
        raise ValueError("export.searched_base needs a search stage")
    if config.eval is not None:
        _owned(config.eval, ("model", "output_dir"), "eval")
        section = dict(config.eval)
        target = plan.search.target_length if plan.search is not None else None
        if target is None and plan.runs:
            target = next(iter(plan.runs.values())).rope.target_length
        section.setdefault("target_length", target)
        ropes = [f"longrope2={out / 'search' / 'best.json'}" if r == "search" else r
                 for r in section.pop("ropes", ["original"])]
        if any(r.startswith("longrope2=") for r in ropes) and plan.search is None:
            raise ValueError("eval.ropes: `search` needs a search stage")
        plan.evals["base"] = configs.from_dict(
            EvalConfig, {**section, "ropes": ropes, "model": plan.base_hf, "output_dir": str(out / "eval" / "base")},
            "eval (base)")
        for name in plan.runs:
            plan.evals[name] = configs.from_dict(
                EvalConfig, {**section, "ropes": ["checkpoint"], "model": str(out / "export" / name),
                             "output_dir": str(out / "eval" / name)}, f"eval ({name})")
    return plan


# --- units of work ----------------------------------------------------------------------------------


@dataclass
class Unit:
    """One piece of a stage with its own folder and completion check."""

    stage: str
    name: str
    marker: Path
    """``.done`` file: written when the unit's outputs are complete, with its config's hash."""
    config: dict
    complete: Callable[[], bool]
    run: Callable[["Launcher"], None]
    distributed: bool = False

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def done(self) -> bool:
        if not self.marker.is_file():
            return False
        recorded = json.loads(self.marker.read_text()).get("config")
        if recorded != self.digest:
            raise PipelineError(f"{self.stage} ({self.name}) finished with another config than the YAML's now; "
                                f"rerun with --from {self.stage} to redo it and the stages after it")
        return True

    def mark(self) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps({"config": self.digest, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))


def _trainer_finished(run) -> bool:
    latest = Path(run.output_dir) / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"iter_{run.train_steps:07d}"


def _write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def units(plan: Plan) -> dict[str, list[Unit]]:
    """The work of every stage present, in order."""
    from longrope2 import configs as cfgs

    out, cfg = plan.out, plan.config
    work: dict[str, list[Unit]] = {s: [] for s in plan.stages}
    for name, prep in plan.prepare.items():
        work["prepare"].append(Unit("prepare", name, out / "prepare" / f".{name}{DONE}", cfgs.to_dict(prep),
                                    lambda p=prep: Path(f"{p.output}.json").is_file(),
                                    lambda launcher, p=prep: launcher.cli("prepare-data", _prepare_args(p))))
    if cfg.import_ is not None:
        imp = cfg.import_
        import_args = ["import-hf", "--hf", imp.hf, "--output", str(plan.base_checkpoint)]
        import_args += ["--model", imp.model] if imp.model else []
        work["import"].append(Unit("import", "checkpoint", out / "import" / DONE, {"hf": imp.hf, "model": imp.model},
                                   lambda: (plan.base_checkpoint / "metadata.json").is_file(),
                                   lambda launcher: launcher.cli("convert", import_args, fresh=plan.base_checkpoint)))
    if plan.pretrain is not None:
        pre = plan.pretrain

        def run_pretrain(launcher: "Launcher") -> None:
            config_file = _write_yaml(out / "pretrain" / "config.yaml", cfgs.to_dict(pre))
            launcher.distributed("launch/train.py", config_file, in_process=("train", pre))

        def export_base(launcher: "Launcher") -> None:
            args = ["export-hf", "--checkpoint", pre.output_dir, "--output", plan.base_hf, "--model", pre.model]
            args += ["--tokenizer", plan.tokenizer] if plan.tokenizer else []
            launcher.cli("convert", args, fresh=Path(plan.base_hf))

        work["pretrain"].append(Unit("pretrain", "train", out / "pretrain" / f".train{DONE}", cfgs.to_dict(pre),
                                     lambda: _trainer_finished(pre), run_pretrain, distributed=True))
        work["pretrain"].append(Unit("pretrain", "hf", out / "pretrain" / f".hf{DONE}",
                                     {"train": cfgs.to_dict(pre), "tokenizer": plan.tokenizer},
                                     lambda: Path(plan.base_hf, "config.json").is_file(), export_base))
    if plan.search is not None:
        search = plan.search

        def run_search(launcher: "Launcher") -> None:
            config_file = _write_yaml(out / "search" / "config.yaml", cfgs.to_dict(search))
            resume = (out / "search" / "state.json").is_file() or any((out / "search").glob("scores.worker*.jsonl"))
            launcher.distributed("launch/search.py", config_file, ["--resume"] if resume else [],
                                 in_process=("search", (search, resume)))

        work["search"].append(Unit("search", "best", out / "search" / DONE, cfgs.to_dict(search),
                                   lambda: (out / "search" / "best.json").is_file(), run_search, distributed=True))
    for name, run in plan.runs.items():
        def run_train(launcher: "Launcher", run=run, name=name) -> None:
            config_file = _write_yaml(out / "train" / name / "config.yaml", cfgs.to_dict(run))
            launcher.distributed("launch/train.py", config_file, in_process=("train", run))

        work["train"].append(Unit("train", name, out / "train" / name / DONE, cfgs.to_dict(run),
                                  lambda run=run: _trainer_finished(run), run_train, distributed=True))
        if "export" in work:
            def run_export(launcher: "Launcher", name=name) -> None:
                model = plan.pretrain.model if plan.pretrain is not None else str(plan.base_checkpoint / "hf")
                args = ["export-hf", "--checkpoint", str(out / "train" / name), "--output", str(out / "export" / name),
                        "--model", model, "--rope", str(out / "train" / name / "config.yaml"),
                        "--rope-style", cfg.export.rope_style, "--dtype", cfg.export.dtype]
                args += ["--tokenizer", plan.tokenizer] if plan.tokenizer else []
                launcher.cli("convert", args, fresh=out / "export" / name)

            work["export"].append(Unit("export", name, out / "export" / f".{name}{DONE}", {
                "run": cfgs.to_dict(run), "export": cfgs.to_dict(cfg.export)},
                lambda name=name: (out / "export" / name / "config.json").is_file(), run_export))
    if cfg.export.searched_base:
        def export_searched(launcher: "Launcher") -> None:
            if plan.pretrain is not None:
                args = ["--checkpoint", plan.pretrain.output_dir, "--model", plan.pretrain.model]
            else:
                args = ["--checkpoint", str(plan.base_checkpoint)]
            args += ["--tokenizer", plan.tokenizer] if plan.tokenizer else []
            launcher.cli("convert", ["export-hf", *args, "--output", str(out / "export" / "base-longrope2"),
                                     "--rope", str(out / "search" / "best.json"), "--rope-style", cfg.export.rope_style,
                                     "--dtype", cfg.export.dtype], fresh=out / "export" / "base-longrope2")

        work["export"].insert(0, Unit("export", "base-longrope2", out / "export" / f".base-longrope2{DONE}",
                                      {"search": cfgs.to_dict(plan.search), "export": cfgs.to_dict(cfg.export)},
                                      lambda: (out / "export" / "base-longrope2" / "config.json").is_file(),
                                      export_searched))
    for name, ev in plan.evals.items():
        def run_eval(launcher: "Launcher", ev=ev, name=name) -> None:
            config_file = _write_yaml(out / "eval" / name / "config.yaml", cfgs.to_dict(ev))
            launcher.cli("eval", ["--config", str(config_file)])

        work["eval"].append(Unit("eval", name, out / "eval" / name / DONE, cfgs.to_dict(ev),
                                 lambda ev=ev: _eval_complete(Path(ev.output_dir)), run_eval))
    if plan.evals:
        work["eval"].append(Unit("eval", "report", out / "eval" / f".report{DONE}", {"models": sorted(plan.evals)},
                                 lambda: (out / "eval" / "report.md").is_file(),
                                 lambda launcher: write_comparison(plan)))
    return work


def _eval_complete(folder: Path) -> bool:
    path = folder / "summary.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("complete"))


def _prepare_args(p) -> list[str]:
    args = ["--output", p.output, "--tokenizer", p.tokenizer, "--min-doc-tokens", str(p.min_doc_tokens),
            "--max-doc-tokens", str(p.max_doc_tokens), "--needle-fraction", str(p.needle_fraction),
            "--text-field", p.text_field, "--seed", str(p.seed)]
    if p.train_tokenizer is not None:
        args += ["--train-tokenizer", str(p.train_tokenizer)]
    return args + list(p.inputs)


# --- launching ------------------------------------------------------------------------------------


def launch_mode() -> str:
    """``inplace`` under torchrun, ``slurm`` inside an allocation, else ``local``
    (``LONGROPE2_PIPELINE_LAUNCH`` overrides)."""
    forced = os.environ.get("LONGROPE2_PIPELINE_LAUNCH")
    if forced:
        if forced not in ("local", "slurm", "inplace"):
            raise PipelineError(f"LONGROPE2_PIPELINE_LAUNCH={forced!r}: use local, slurm or inplace")
        return forced
    if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
        return "inplace"
    if "SLURM_JOB_ID" in os.environ and shutil.which("srun"):
        return "slurm"
    return "local"


class Launcher:
    """Runs a unit's commands: one-process verbs as ``python -m longrope2.cli`` subprocesses,
    distributed scripts under torchrun, srun or in this process (see ``launch_mode``)."""

    def __init__(self, config: PipelineConfig, mode: str):
        self.config, self.mode = config, mode
        self.rank = int(os.environ.get("RANK", "0")) if mode == "inplace" else 0

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    def _call(self, command: list[str], what: str, env: Optional[dict] = None) -> None:
        if self.rank == 0:
            print(f"[pipeline] $ {' '.join(command)}", flush=True)
        code = subprocess.call(command, cwd=ROOT, env=env or self._env())
        if code != 0:
            raise PipelineError(f"{what} failed (exit status {code}); its output is above")

    def cli(self, verb: str, args: list[str], fresh: Optional[Path] = None) -> None:
        if fresh is not None and fresh.exists():  # a partial output of a killed run: redo it
            shutil.rmtree(fresh)
        self._call([sys.executable, "-m", "longrope2.cli", verb, *args], f"longrope2 {verb}")

    def distributed(self, script: str, config_file: Path, extra: list[str] = (), in_process=None) -> None:
        if self.mode == "inplace":
            kind, value = in_process
            if kind == "train":
                from longrope2.train.trainer import train

                train(value)
            else:
                from longrope2.search.run import run_search

                run_search(*value)
            return
        if self.mode == "slurm":
            # ranks per node: NPROC_PER_NODE, else the node's GPUs (slurm/torchrun.sh), not the YAML's local count
            env = {**self._env(), "ENTRY": script, "CONFIG": str(config_file), "EXTRA_ARGS": " ".join(extra)}
            self._call(["bash", str(ROOT / "slurm" / "torchrun.sh")], f"srun {script}", env)
            return
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.config.nproc_per_node}",
                   "--master_addr=127.0.0.1", f"--master_port={self.config.master_port}", script,
                   "--config", str(config_file), *extra]
        self._call(command, f"torchrun {script}")


def _wait_for(unit: Unit, timeout_s: float) -> None:
    """Ranks other than 0 (in-process mode): wait for rank 0 to finish the unit."""
    deadline = time.time() + timeout_s
    failed = unit.marker.with_name(unit.marker.name + ".failed")
    while not unit.marker.is_file():
        if failed.is_file():
            raise PipelineError(f"{unit.stage} ({unit.name}) failed on rank 0")
        if time.time() > deadline:
            raise PipelineError(f"{unit.stage} ({unit.name}): rank 0 did not finish it in {timeout_s:.0f} s")
        time.sleep(1.0)


def run_unit(unit: Unit, launcher: Launcher) -> None:
    leader = launcher.rank == 0
    if unit.distributed or leader:
        failed = unit.marker.with_name(unit.marker.name + ".failed")
        if leader:
            failed.unlink(missing_ok=True)
        try:
            unit.run(launcher)
            if leader and not unit.complete():
                raise PipelineError(f"{unit.stage} ({unit.name}) stopped before it finished (preempted or "
                                    "signalled?); run the pipeline again to resume it")
        except BaseException:
            if leader:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text("failed\n")
            raise
        if leader:
            unit.mark()
    if not leader:
        _wait_for(unit, timeout_s=float(os.environ.get("LONGROPE2_PIPELINE_WAIT_S", 7 * 24 * 3600)))


def remove_outputs(plan: Plan, stages: list[str]) -> None:
    for stage in stages:
        folder = plan.stage_dir(stage)
        if folder.exists():
            print(f"[pipeline] removing {folder} (re-running {stage})", flush=True)
            shutil.rmtree(folder)


def execute(plan: Plan, start: Optional[str] = None, only: Optional[str] = None) -> None:
    work = units(plan)
    stages = plan.stages
    for name in filter(None, (start, only)):
        if name not in stages:
            raise PipelineError(f"stage {name!r} is not in this pipeline; its stages: {', '.join(stages)}")
    launcher = Launcher(plan.config, launch_mode())
    if only is not None:
        missing = [f"{u.stage} ({u.name})" for s in stages[:stages.index(only)] for u in work[s] if not u.done()]
        if missing:
            raise PipelineError(f"--only {only}: earlier stages are not finished: {', '.join(missing)}")
        selected = [only]
    else:
        selected = stages[stages.index(start):] if start else stages
    if launcher.rank == 0 and (start or only):
        remove_outputs(plan, [only] if only else selected)
    if launcher.mode == "inplace":
        _own_process_group()
        _barrier_on_files(plan.out / ".start", launcher.rank)  # every rank sees the removals first
    say = print if launcher.rank == 0 else (lambda *args, **kwargs: None)
    say(f"[pipeline] {plan.config.output_dir}: stages {' -> '.join(stages)} ({launcher.mode} launch)", flush=True)
    for stage in selected:
        for unit in work[stage]:
            if unit.done():
                say(f"[pipeline] {stage} ({unit.name}): done, skipped", flush=True)
                continue
            say(f"[pipeline] {stage} ({unit.name}): running", flush=True)
            started = time.time()
            run_unit(unit, launcher)
            say(f"[pipeline] {stage} ({unit.name}): finished in {time.time() - started:.0f} s", flush=True)
    if "eval" in selected:
        say(f"[pipeline] report: {plan.out / 'eval' / 'report.md'}", flush=True)


def _own_process_group() -> None:
    """In-process mode: one default process group for the whole pipeline, so that every
    distributed stage builds its megatron groups on it (initializing torch.distributed a second
    time in the same torchrun job hangs on the rendezvous store's stale keys)."""
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(minutes=30))


def _barrier_on_files(folder: Path, rank: int) -> None:
    """In-process mode, before any stage: rank 0 has finished its removals."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    flag = folder / f"{run_id}.ready"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        flag.write_text("ready\n")
    else:
        deadline = time.time() + 600
        while not flag.is_file():
            if time.time() > deadline:
                raise PipelineError("rank 0 did not start the pipeline in 600 s")
            time.sleep(0.5)


# --- dry run ----------------------------------------------------------------------------------------


def dry_run_lines(plan: Plan, world: int, gpus_per_node: Optional[int], gpu_memory_gib: float,
                  eta_args=None) -> tuple[list[str], bool]:
    """Every stage's plan, as text; and whether every distributed stage fits in memory.
    ``eta_args``: the parsed ``--gpu-tflops``/``--mfu``/``--probe`` flags for the search's ETA."""
    from longrope2.train.plan import plan_search, plan_train, throughputs_from_args

    lines = [f"pipeline {plan.config.output_dir}: {' -> '.join(plan.stages)} ({world} ranks for the distributed stages)"]
    fits = True
    if plan.prepare:
        lines.append("\n== prepare")
        for name, p in plan.prepare.items():
            inputs = ", ".join(p.inputs) if p.inputs else "the embedded books"
            tok = f"train a {p.train_tokenizer}-piece sentencepiece BPE into {p.tokenizer}" if p.train_tokenizer \
                else f"tokenizer {p.tokenizer}"
            lines.append(f"  {name}: {inputs}; {tok}; documents {p.min_doc_tokens}..{p.max_doc_tokens} tokens, "
                         f"{p.needle_fraction:.0%} needle documents -> {p.output}")
    if plan.config.import_ is not None:
        lines += ["\n== import", f"  {plan.config.import_.hf} -> {plan.base_checkpoint} (megatron dist checkpoint)"]
    def train_plan(title: str, run) -> bool:
        lines.append(f"\n== {title}")
        try:
            text, memory = plan_train(run, world, gpus_per_node, gpu_memory_gib)
            lines.extend("  " + line for line in text)
            return memory.fits
        except (ValueError, FileNotFoundError) as error:
            lines.append(f"  error: {error}")
            return False

    if plan.pretrain is not None:
        fits &= train_plan("pretrain", plan.pretrain)
    if plan.search is not None:
        lines.append("\n== search")
        search = plan.search
        if plan.config.import_ is not None and plan.config.import_.model and not Path(search.checkpoint or "").exists():
            search = copy.copy(search)  # the architecture from the preset until the weights are there
            search.checkpoint, search.model = None, plan.config.import_.model
        elif plan.pretrain is not None:
            search = copy.copy(search)
            search.checkpoint, search.model = None, plan.pretrain.model
        try:
            rates = throughputs_from_args(eta_args, search) if eta_args is not None else None
            text, memory = plan_search(search, world, gpus_per_node, gpu_memory_gib, rates)
            fits &= memory.fits
            lines += ["  " + line for line in text]
        except (ValueError, FileNotFoundError) as error:
            lines.append(f"  error: {error}")
            fits = False
    for name, run in plan.runs.items():
        fits &= train_plan(f"train ({name})", run)
    if "export" in plan.stages:
        lines.append("\n== export")
        if plan.config.export.searched_base:
            lines.append("  base-longrope2: the base model with search/best.json, untrained -> export/base-longrope2")
        if plan.evals:
            lines += [f"  {name}: train/{name} -> export/{name} (HF folder, {plan.config.export.rope_style})"
                      for name in plan.runs]
    if plan.evals:
        from longrope2.eval.run import plan as eval_plan

        lines.append("\n== eval")
        for name, ev in plan.evals.items():
            groups, skipped = eval_plan(ev)
            cells = sum(len(batch) for _, _, batch in groups)
            lines.append(f"  {name}: {ev.model} under {', '.join(ev.ropes)} at {ev.lengths}: {cells} samples x "
                         f"{len(ev.ropes)} ropes -> {ev.output_dir}")
            lines.extend(f"    skipped: {why}" for why in skipped)
        lines.append(f"  then {plan.out / 'eval' / 'report.md'} and comparison.png over all of them")
    return lines, fits


# --- the comparison over every evaluated model -------------------------------------------------------


def write_comparison(plan: Plan) -> Path:
    """``eval/comparison.json``, ``report.md`` and ``comparison.png``: every metric of every
    model x rope, from each eval's ``summary.json``."""
    merged: dict[str, dict] = {}
    for name, ev in plan.evals.items():
        summary = json.loads((Path(ev.output_dir) / "summary.json").read_text())
        for metric, by_rope in summary["metrics"].items():
            for rope, by_length in by_rope.items():
                label = name if rope == "checkpoint" else f"{name}/{rope}"
                merged.setdefault(metric, {})[label] = by_length
    folder = plan.out / "eval"
    (folder / "comparison.json").write_text(json.dumps(merged, indent=1))
    lines = [f"# {plan.config.output_dir}: every model on the same tasks", "",
             "Rows: `base/ROPE` is the base model under that rope (no training); every other row is a trained "
             "run under its own rope. PPL: lower is better; accuracy in %. `n` = samples per cell.", ""]
    for metric, rows in merged.items():
        key = "ppl" if any("ppl" in cell for by in rows.values() for cell in by.values()) else "accuracy"
        lengths = sorted({int(n) for by in rows.values() for n in by})
        lines += [f"## {metric} ({key})", "", "| model | " + " | ".join(str(n) for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for label, by in rows.items():
            cells = []
            for n in lengths:
                cell = by.get(str(n))
                if cell is None:
                    cells.append("")
                else:
                    value = cell[key] * (100 if key == "accuracy" else 1)
                    cells.append(f"{value:.3f} (n={cell.get('samples', '?')})" if key == "ppl"
                                 else f"{value:.0f} (n={cell.get('samples', '?')})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    (folder / "report.md").write_text("\n".join(lines))
    _plot_comparison(folder / "comparison.png", merged)
    return folder / "report.md"


def _plot_comparison(path: Path, merged: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(merged)
    if not metrics:
        return
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for i, (label, by) in enumerate(merged[metric].items()):
            lengths = sorted(int(n) for n in by)
            key = "ppl" if "ppl" in by[str(lengths[0])] else "accuracy"
            ax.plot(lengths, [by[str(n)][key] for n in lengths], "o-", color=f"C{i % 10}", label=label,
                    ls="--" if label.startswith("base") else "-")
            ax.set_yscale("log" if key == "ppl" else "linear")
            ax.set_ylabel(key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(metric)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    from longrope2.cli import INPUT_ERRORS, CLIParser, describe_input_error
    from longrope2.train.plan import add_dry_run_args, resolve_world_size

    parser = CLIParser(prog="longrope2 pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="pipeline YAML (configs/pipeline/)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start", metavar="STAGE", choices=STAGES,
                       help="re-run this stage and every later one (their outputs are removed first)")
    which.add_argument("--only", metavar="STAGE", choices=STAGES, help="re-run only this stage")
    add_dry_run_args(parser, search=True)
    args = parser.parse_args(argv)
    try:
        config = PipelineConfig.from_yaml(args.config)
        plan = build_plan(config)
        if args.dry_run:
            world = resolve_world_size(args.nodes, args.gpus_per_node, args.world_size) \
                if (args.nodes or args.world_size) else config.nproc_per_node
            lines, fits = dry_run_lines(plan, world, args.gpus_per_node, args.gpu_memory_gib, args)
            print("\n".join(lines))
            return 0 if fits else 1
        execute(plan, start=args.start, only=args.only)
    except PipelineError as error:  # a stage failed: its own log says why
        print(f"longrope2 pipeline: {error}", file=sys.stderr)
        return 1
    except INPUT_ERRORS as error:
        print(f"longrope2 pipeline: error: {describe_input_error(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
