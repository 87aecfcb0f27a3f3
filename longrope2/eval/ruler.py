"""RULER (Hsieh et al. 2024, NVIDIA/RULER) as the field runs it: its 13 tasks, its templates, the
data files its ``scripts/data/prepare.py`` writes, and its scoring.

A RULER data folder holds ``<task>/validation.jsonl``, one sample per line: ``input`` (the prompt
up to the answer prefix, model template included), ``answer_prefix``, ``outputs`` (the
references), ``length`` (prompt tokens + tokens to generate, BOS not counted) and an ``index``
that is not unique for NIAH (RULER overwrites it with the answer's character offset), so samples
are aligned by line. RULER's predictor feeds ``input + answer_prefix`` to the model (the HF
tokenizer adds its BOS), decodes the continuation, strips it and turns control characters into
newlines (``scripts/eval/evaluate.py::postprocess_pred``), and scores each task as
``round(100 * mean, 2)`` of ``string_match_part`` (QA) or ``string_match_all`` (the rest;
``scripts/eval/synthetic/constants.py``). Our own generator (``eval/ruler_gen.py``) writes the
same records, so both paths share the reader, the prompt and the scoring below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from longrope2.eval.scoring import postprocess, score
from longrope2.eval.tasks import Sample

# RULER scripts/data/synthetic/constants.py (the "assgined" typo is fixed upstream; so here)
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
               "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
QA_ANSWER_PREFIX = " Answer:"


@dataclass(frozen=True)
class Family:
    """One of RULER's task scripts (``scripts/data/synthetic/<name>.py``)."""

    tokens_to_generate: int
    template: str
    answer_prefix: str
    metric: str
    """``all`` (string_match_all) or ``part`` (string_match_part)."""


FAMILIES = {
    "niah": Family(128, NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, "all"),
    "variable_tracking": Family(30, VT_TEMPLATE, VT_ANSWER_PREFIX, "all"),
    "common_words_extraction": Family(120, CWE_TEMPLATE, CWE_ANSWER_PREFIX, "all"),
    "freq_words_extraction": Family(50, FWE_TEMPLATE, FWE_ANSWER_PREFIX, "all"),
    "qa": Family(32, QA_TEMPLATE, QA_ANSWER_PREFIX, "part"),
}


def _niah(haystack: str, k: str = "words", v: str = "numbers", nk: int = 1, nv: int = 1, nq: int = 1):
    return "niah", {"type_haystack": haystack, "type_needle_k": k, "type_needle_v": v, "num_needle_k": nk,
                    "num_needle_v": nv, "num_needle_q": nq}


# RULER scripts/synthetic.yaml: the 13 tasks of the benchmark, in config_tasks.sh's order
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "niah_single_1": _niah("noise"),
    "niah_single_2": _niah("essay"),
    "niah_single_3": _niah("essay", v="uuids"),
    "niah_multikey_1": _niah("essay", nk=4),
    "niah_multikey_2": _niah("needle"),
    "niah_multikey_3": _niah("needle", k="uuids", v="uuids"),
    "niah_multivalue": _niah("essay", nv=4),
    "niah_multiquery": _niah("essay", nq=4),
    "vt": ("variable_tracking", {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}),
    "cwe": ("common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": ("freq_words_extraction", {"alpha": 2.0}),
    "qa_1": ("qa", {"dataset": "squad"}),
    "qa_2": ("qa", {"dataset": "hotpotqa"}),
}
RULER_TASKS = tuple(TASKS)
QA_DATASETS = {"qa_1": "squad", "qa_2": "hotpotqa"}


def family(task: str) -> Family:
    try:
        return FAMILIES[TASKS[task][0]]
    except KeyError:
        raise ValueError(f"unknown RULER task {task!r}; RULER's tasks: {', '.join(RULER_TASKS)}") from None


# --- RULER's data files ------------------------------------------------------------------------
@dataclass(frozen=True)
class RulerRecord:
    """One line of a RULER ``validation.jsonl``."""

    input: str
    outputs: list[str]
    answer_prefix: str = ""
    length: int | None = None
    """RULER's: prompt tokens (BOS not counted) + tokens to generate."""
    extra: dict = field(default_factory=dict)

    def to_json(self, index: int) -> dict[str, Any]:
        return {"index": index, "input": self.input, "outputs": self.outputs, "length": self.length,
                "length_w_model_temp": self.length, "answer_prefix": self.answer_prefix, **self.extra}


def read_task_file(path: str | Path) -> list[RulerRecord]:
    """The samples of one RULER task file, in line order; a malformed line is an error naming it."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
            raise ValueError(f"{path}:{number}: a RULER sample needs a string 'input'")
        outputs = raw.get("outputs", [raw["output"]] if "output" in raw else None)
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise ValueError(f"{path}:{number}: 'outputs' must be a non-empty list of strings")
        prefix = raw.get("answer_prefix", "")
        if not isinstance(prefix, str):
            raise ValueError(f"{path}:{number}: 'answer_prefix' must be a string")
        extra = {k: v for k, v in raw.items() if k not in ("input", "outputs", "output", "answer_prefix", "length")}
        records.append(RulerRecord(raw["input"], outputs, prefix, raw.get("length"), extra))
    if not records:
        raise ValueError(f"{path}: no samples")
    return records


def write_task_file(path: str | Path, records: Sequence[RulerRecord]) -> None:
    """RULER's ``manifest_utils.write_manifest`` format (``json.dump``, ASCII, one line each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for index, record in enumerate(records):
            f.write(json.dumps(record.to_json(index)) + "\n")


def task_file(data_dir: str | Path, task: str, length: int, subset: str = "validation") -> Path:
    """``<data_dir>/<task>/<subset>.jsonl``; ``{length}`` in ``data_dir`` is replaced by the length
    (RULER's ``benchmark_root/<model>/synthetic/<length>/data``)."""
    return Path(str(data_dir).replace("{length}", str(length))) / task / f"{subset}.jsonl"


# --- prompt and scoring --------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatWrap:
    """The tokenizer's chat template around one user turn, split at the turn's content, as
    RULER's ``template.py`` model templates (``"<|user|>\\n{task_template}<|end|>\\n<|assistant|>\\n"``):
    the answer prefix follows the assistant header."""

    prefix: str = ""
    suffix: str = ""

    @classmethod
    def from_tokenizer(cls, hf_tokenizer) -> "ChatWrap":
        marker = "\x00RULER-TASK\x00"
        if hf_tokenizer is None or not getattr(hf_tokenizer, "chat_template", None):
            raise ValueError("ruler.chat_template: the tokenizer has no chat template")
        text = hf_tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                                add_generation_prompt=True)
        if text.count(marker) != 1:
            raise ValueError("ruler.chat_template: the chat template does not keep the user message intact")
        prefix, suffix = text.split(marker)
        return cls(prefix, suffix)

    def wrap(self, text: str) -> str:
        return self.prefix + text + self.suffix

    def template(self, task_template: str) -> str:
        """A ``str.format`` template with the chat turn around ``task_template``."""
        escape = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
        return escape(self.prefix) + task_template + escape(self.suffix)


def prompt_tokens(text: str, encode: Callable[[str], list[int]], bos_token_id: int | None,
                  bos_text: str | None = None) -> list[int]:
    """What RULER's HF/vLLM predictor feeds: the tokenizer's BOS (when it adds one) + the text.
    A text that already starts with the BOS token (a chat template that writes it) gets no second."""
    starts_with_bos = bos_text is not None and text.startswith(bos_text)
    return ([bos_token_id] if bos_token_id is not None and not starts_with_bos else []) + encode(text)


def to_sample(record: RulerRecord, task: str, length: int, index: int, encode: Callable[[str], list[int]],
              bos_token_id: int | None, max_new_tokens: int | None = None, chat: ChatWrap | None = None,
              bos_text: str | None = None) -> Sample:
    """A RULER record as an eval sample: prompt = ``input`` (in the chat turn if asked) +
    ``answer_prefix``, references = ``outputs``, RULER's tokens to generate and metric."""
    fam = family(task)
    text = (chat.wrap(record.input) if chat else record.input) + record.answer_prefix
    return Sample(task, length, index, prompt_tokens(text, encode, bos_token_id, bos_text), list(record.outputs),
                  fam.metric, max_new_tokens or fam.tokens_to_generate, meta={"ruler_length": record.length})


def sample_score(task: str, prediction: str, references: Sequence[str]) -> float:
    """One sample's RULER score in [0, 1], after RULER's post-processing."""
    return score(family(task).metric, postprocess(prediction), references)


def task_score(scores: Sequence[float]) -> float:
    """RULER's task score: ``round(100 * mean, 2)``."""
    if not scores:
        raise ValueError("a task score needs at least one sample")
    return round(sum(scores) / len(scores) * 100, 2)


__all__ = ["FAMILIES", "TASKS", "RULER_TASKS", "QA_DATASETS", "Family", "RulerRecord", "ChatWrap", "family",
           "read_task_file", "write_task_file", "task_file", "prompt_tokens", "to_sample", "sample_score",
           "task_score"]
