"""``longrope2 eval`` configuration (YAML, loaded strictly: unknown keys are errors).

A task section with ``samples: 0`` is skipped; ``lengths: null`` means the top-level lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longrope2 import configs
from longrope2.eval.ruler import RULER_TASKS


def _check_lengths(lengths: list[int] | None, name: str) -> None:
    if lengths is not None and (not lengths or any(int(n) < 16 for n in lengths)):
        raise ValueError(f"{name}.lengths must be a non-empty list of token counts >= 16, got {lengths}")


@dataclass(kw_only=True)
class NeedlePplTask:
    samples: int = 0
    """Needle documents per length (paper: 10 PG19 books), needle near the start."""
    lengths: list[int] | None = None
    depth: float = 0.0

    def __post_init__(self) -> None:
        if self.samples < 0 or not 0 <= self.depth <= 1:
            raise ValueError(f"needle_ppl: samples must be >= 0 and depth in [0, 1], got {self.samples}, {self.depth}")
        _check_lengths(self.lengths, "needle_ppl")


@dataclass(kw_only=True)
class BookPplTask:
    samples: int = 0
    """Book windows per length (cycling over the books)."""
    lengths: list[int] | None = None
    last_tokens: int = 512
    """Tokens scored at the end of each window (capped at half the window)."""

    def __post_init__(self) -> None:
        if self.samples < 0 or self.last_tokens < 1:
            raise ValueError("book_ppl: samples must be >= 0 and last_tokens >= 1")
        _check_lengths(self.lengths, "book_ppl")


@dataclass(kw_only=True)
class RetrievalTask:
    samples: int = 0
    """Samples per (length, depth); with ``depths: null`` samples per length at random depths."""
    lengths: list[int] | None = None
    depths: list[float] | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError("samples must be >= 0")
        if self.depths is not None and (not self.depths or any(not 0 <= d <= 1 for d in self.depths)):
            raise ValueError(f"depths must be a non-empty list in [0, 1], got {self.depths}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        _check_lengths(self.lengths, "retrieval task")


@dataclass(kw_only=True)
class RulerTasks:
    """RULER's 13 tasks (``eval/ruler.py``), read from RULER's own data or generated here."""

    samples: int = 0
    """Samples per (task, length): the first lines of each data file, or generated."""
    tasks: list[str] = field(default_factory=lambda: list(RULER_TASKS))
    lengths: list[int] | None = None
    data_dir: str | None = None
    """The folder RULER's ``prepare.py`` writes (``<task>/validation.jsonl``), for the model's own
    tokenizer; ``{length}`` in it is replaced by each length (RULER's
    ``benchmark_root/<model>/synthetic/<length>/data``). None = generate the tasks here."""
    chat_template: bool = False
    """Put each prompt in the tokenizer's chat template (one user turn; the answer prefix after the
    assistant header), as RULER's model templates do. Generated data only: RULER's files carry the
    template ``prepare.py --model_template_type`` gave them."""
    squad: str | None = None
    """SQuAD v2 dev JSON (RULER's ``json/squad.json``) for ``qa_1``; without it qa_1 is skipped."""
    hotpotqa: str | None = None
    """HotpotQA dev distractor JSON (RULER's ``json/hotpotqa.json``) for ``qa_2``."""
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    """Per task; default RULER's tokens_to_generate (niah 128, vt 30, cwe 120, fwe 50, qa 32)."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if unknown:
            raise ValueError(f"ruler: unknown tasks {unknown}; RULER's tasks: {list(RULER_TASKS)}")
        bad = [t for t in self.max_new_tokens if t not in RULER_TASKS]
        if bad:
            raise ValueError(f"ruler.max_new_tokens: unknown tasks {bad}")
        if self.samples < 0:
            raise ValueError("ruler.samples must be >= 0")
        if self.chat_template and self.data_dir:
            raise ValueError("ruler.chat_template applies to generated tasks; RULER's data files carry their own "
                             "template (prepare.py --model_template_type)")
        _check_lengths(self.lengths, "ruler")


@dataclass(kw_only=True)
class ShortContext:
    """Short-context retention: book PPL inside the original window under every rope vs the
    ``original`` rope (HF applies a longrope model's attention factor at every length), and
    lm-evaluation-harness tasks when ``lm_eval`` and the task data are available."""

    samples: int = 0
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    last_tokens: int = 512
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    """Examples per lm_eval task (None = all)."""

    def __post_init__(self) -> None:
        if self.samples < 0 or self.last_tokens < 1:
            raise ValueError("short_context: samples must be >= 0 and last_tokens >= 1")
        _check_lengths(self.lengths, "short_context")


@dataclass(kw_only=True)
class EvalConfig:
    model: str
    """HF folder, ``.gguf`` file, ``smollm2`` (the embedded SmolLM2-135M) or a megatron checkpoint."""
    output_dir: str
    megatron_model: str | None = None
    """For a megatron checkpoint without the ``hf/`` folder ``convert import-hf`` leaves: the
    preset, model YAML or HF folder passed to ``convert export-hf --model``."""
    ropes: list[str] = field(default_factory=lambda: ["original", "yarn"])
    """checkpoint, original, pi, ntk, yarn, or [LABEL=]PATH.json (a search best.json, rope_config.json)."""
    target_length: int | None = None
    """Extended window for the pi/ntk/yarn/original configs (files carry their own)."""
    lengths: list[int] = field(default_factory=lambda: [4096, 8192])
    tokenizer: str | None = None
    """None = the checkpoint's; ``hashed-words`` (PPL tasks only) for random-weight models."""
    books: list[str] | None = None
    """Text files or folders (e.g. PG19); None = the embedded public-domain books."""
    seed: int = 0
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    """``auto``: this rank's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    batch_size: int = 1
    """Prompts of one task and length per forward in greedy decoding (left-padded)."""
    order: str = "length"
    """``length``: every task at the shortest length first; ``task``: needle PPL at every length,
    then passkey, book PPL, short context, needle, RULER (what a slow machine finishes first)."""
    needle_ppl: NeedlePplTask = field(default_factory=NeedlePplTask)
    book_ppl: BookPplTask = field(default_factory=BookPplTask)
    passkey: RetrievalTask = field(default_factory=RetrievalTask)
    needle: RetrievalTask = field(default_factory=RetrievalTask)
    """Needle-in-a-haystack by greedy decoding; report as a depth x length heatmap."""
    ruler: RulerTasks = field(default_factory=RulerTasks)
    short_context: ShortContext = field(default_factory=ShortContext)

    def __post_init__(self) -> None:
        if not self.ropes:
            raise ValueError("ropes must name at least one rope config")
        if len(set(self.ropes)) != len(self.ropes):
            raise ValueError(f"ropes repeats an entry: {self.ropes}")
        _check_lengths(self.lengths, "eval")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.order not in ("length", "task"):
            raise ValueError(f"order must be length or task, got {self.order!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tokenizer not in (None, "hashed-words"):
            raise ValueError(f"tokenizer {self.tokenizer!r}: use null (the checkpoint's) or hashed-words")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "EvalConfig":
        return configs.load_yaml(cls, path, overrides=overrides, what="eval config")
