"""RULER's 13 tasks generated here, for machines without NVIDIA/RULER: the logic of its
``scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction,qa}.py``
re-written on a per-sample random stream, producing the records ``prepare.py`` writes.

Kept from RULER: the templates and answer prefixes (``eval/ruler.py``), the singular wording when
one key and one value are asked, the needle sentence (always "numbers"/"uuids" in the plural, as
RULER formats it), keys and values of each kind (wonderwords adjective-noun pairs, 7-digit
numbers, uuid4s), the noise and needle haystacks (one sentence per line), the essay haystack's
first N words split into sentences with needles at 40 depths, ``vt``'s worked example (3-letter
variables, value 12345, re-randomised per sample) and one-assignment-per-line chains, ``cwe``'s
worked example and frequencies (30/3, or 6/1 below 4k), ``fwe``'s Zipf counts with ``...`` as the
top word, QA's document sampling, and RULER's length rule (a binary search for the haystack size
on one sample, then each sample shrinks by RULER's step until it fits; prompts therefore end up
to several hundred tokens short of the length, as RULER's do).

Differences (the README lists them): the books stand in for the Paul Graham essays; sentences are
split by a regular expression (RULER: nltk punkt); ``cwe`` beyond wonderwords' 8.7k words adds the
books' vocabulary (RULER: its english_words.json); each sample draws from its own random stream
(RULER: one stream per file), so a sample depends only on ``(seed, task, length, index)``.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from longrope2.eval.ruler import FAMILIES, QA_DATASETS, TASKS, ChatWrap, RulerRecord

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)).astype(int)
DOCUMENT_PROMPT = "Document {i}:\n{document}"
_SENTENCE_END = re.compile(r"(?<=[.!?]) +|(?<=[.!?][\"'\u2019\u201d)\]]) +")


def split_sentences(text: str) -> list[str]:
    """Sentences of single-spaced text: a break after ``.!?`` (and a closing quote) and a space."""
    return [s for s in _SENTENCE_END.split(text) if s]


def singular(template: str) -> str:
    """RULER's rewording when one key and one value are asked (niah.py)."""
    return (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


@functools.lru_cache(maxsize=1)
def wonderwords_lists() -> dict[str, list[str]]:
    """wonderwords' noun, adjective and verb lists, the ones RULER reads."""
    from importlib.resources import files

    try:
        assets = files("wonderwords.assets")
    except ModuleNotFoundError:
        raise ValueError("RULER's key words come from the wonderwords package: pip install wonderwords") from None
    return {name: [w.rstrip() for w in (assets / f"{name}list.txt").read_text().splitlines()]
            for name in ("noun", "adjective", "verb")}


@functools.lru_cache(maxsize=1)
def key_parts() -> tuple[list[str], list[str]]:
    """RULER's keys are ``sorted(set(f"{adj}-{noun}"))`` over wonderwords' lists (6M strings); one
    uniform draw from it is an adjective and a noun drawn uniformly from the de-duplicated lists."""
    lists = wonderwords_lists()
    return sorted(set(lists["adjective"])), sorted(set(lists["noun"]))


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta (scipy.special.zeta's value for alpha > 1) by Euler-Maclaurin."""
    head = sum(k ** -alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2 + alpha * terms ** (-alpha - 1) / 12


def read_squad(path: str | Path) -> tuple[list[dict], list[str]]:
    """RULER's ``read_squad``: answerable questions, each with its paragraph and its article's others."""
    data = json.loads(Path(path).read_text())
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        more = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa.get("is_impossible", False):
                    qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                "context": [index[p["context"]]],
                                "more_context": [i for i in more if i != index[p["context"]]]})
    return qas, docs


def read_hotpotqa(path: str | Path) -> tuple[list[dict], list[str]]:
    """RULER's ``read_hotpotqa``: each question with its (gold and distractor) paragraphs."""
    data = json.loads(Path(path).read_text())
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    return qas, docs


class RulerGenerator:
    """RULER records for any task, length and index, from one tokenizer's token count."""

    def __init__(self, count_tokens: Callable[[str], int], books: Sequence[tuple[str, str]], seed: int = 42,
                 chat: ChatWrap | None = None, qa_files: dict[str, str | None] | None = None):
        if not books:
            raise ValueError("the essay haystack needs books")
        self.count, self.seed, self.chat = count_tokens, seed, chat or ChatWrap()
        self.essay = re.sub(r"\s+", " ", " ".join(text for _, text in books)).split(" ")
        self.qa_files = {task: qa_files.get(task) for task in QA_DATASETS} if qa_files else {}
        self._qa: dict[str, tuple[list[dict], list[str]]] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._vt_examples: dict[int, str] = {}

    def available(self, task: str) -> str | None:
        """None, or why ``task`` cannot be generated here."""
        if task in QA_DATASETS and not self.qa_files.get(task):
            name = "SQuAD v2 (dev-v2.0.json)" if task == "qa_1" else "HotpotQA (hotpot_dev_distractor_v1.json)"
            return f"{task} needs {name}: set ruler.{QA_DATASETS[task]} to its path"
        return None

    def template(self, task: str, reword: Callable[[str], str] = lambda t: t) -> str:
        """RULER's prompt template: the task template (in the chat turn) + the answer prefix;
        ``reword`` changes the task's own words only (RULER's singular rule would also reach a chat
        template's system prompt: "You are" -> "You is")."""
        fam = FAMILIES[TASKS[task][0]]
        return self.chat.template(reword(fam.template)) + reword(fam.answer_prefix)

    def rng(self, *parts) -> random.Random:
        return random.Random("|".join(str(p) for p in (self.seed, *parts)))

    def record(self, task: str, length: int, index: int) -> RulerRecord:
        name, args = TASKS[task]
        reason = self.available(task)
        if reason:
            raise ValueError(reason)
        fam = FAMILIES[name]
        make = {"niah": self._niah, "variable_tracking": self._vt, "common_words_extraction": self._cwe,
                "freq_words_extraction": self._fwe, "qa": self._qa_task}[name]
        try:
            text, answer, extra = make(task, args, length, index, fam.tokens_to_generate)
        except ValueError as error:
            raise ValueError(f"{task} at {length} tokens: {error}") from None
        cut = text.rfind(fam.answer_prefix[:10])  # RULER: the first 10 characters locate the prefix
        return RulerRecord(text[:cut], list(answer), text[cut:], self.count(text) + fam.tokens_to_generate, extra)

    # --- RULER's length rule --------------------------------------------------------------------
    def _size(self, key: tuple[str, int], build: Callable[[int, random.Random], str], budget: int,
              incremental: int, extra_tokens: int = 0, probe: int | None = None) -> int:
        """Largest haystack size whose one sample fits ``budget`` (RULER's binary search)."""
        if key not in self._sizes:
            rng = self.rng(*key, "search")
            probe = probe or incremental
            per_unit = self.count(build(probe, rng)) / probe
            lower, upper, best = incremental, max(int(budget / per_unit * 3), incremental * 2), None
            while lower <= upper:
                mid = (lower + upper) // 2
                if self.count(build(mid, rng)) + extra_tokens <= budget:
                    best, lower = mid, mid + 1
                else:
                    upper = mid - 1
            self._sizes[key] = best if best is not None else incremental
        return self._sizes[key]

    def _shrink_to_fit(self, build: Callable[[int], str], size: int, budget: int, incremental: int) -> str:
        """RULER's per-sample loop: rebuild ``incremental`` units smaller until it fits."""
        while True:
            text = build(size)
            if self.count(text) <= budget:
                return text
            if size <= incremental:
                raise ValueError(f"even the smallest haystack ({size}) exceeds {budget} tokens")
            size -= incremental

    # --- niah.py --------------------------------------------------------------------------------
    def _random_value(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            adjectives, nouns = key_parts()
            r = rng.randrange(len(adjectives) * len(nouns))
            return f"{adjectives[r // len(nouns)]}-{nouns[r % len(nouns)]}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"unknown needle kind {kind!r}")

    def _niah_text(self, args: dict, templates: tuple[str, str], size: int,
                   rng: random.Random) -> tuple[str, list[str]]:
        kind_k, kind_v, haystack = args["type_needle_k"], args["type_needle_v"], args["type_haystack"]
        num_q, num_v = args["num_needle_q"], args["num_needle_v"]
        num_k = max(args["num_needle_k"], num_q)
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(self._random_value(rng, kind_k))
            values.append([])
            for _ in range(num_v):
                values[-1].append(self._random_value(rng, kind_v))
                needles.append(NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=values[-1][-1]))
        rng.shuffle(needles)
        if haystack == "essay":
            repeats = -(-size // len(self.essay))
            sentences = split_sentences(" ".join((self.essay * repeats)[:size]).strip())
            cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + \
                [len(sentences)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if haystack == "noise":
                lines = [NOISE] * size
            else:  # "needle": a haystack of other keys' needles
                lines = [NEEDLE.format(type_needle_v=kind_v, key=self._random_value(rng, kind_k),
                                       value=self._random_value(rng, kind_v)) for _ in range(size)]
            for at, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
                lines.insert(at, needle)
            context = "\n".join(lines)
        queried = rng.sample(range(num_k), num_q)
        queries = [keys[i] for i in queried]
        answers = [a for i in queried for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        one = num_q * num_v == 1  # RULER: singular wording, "number" / "uuid"
        template, type_v = (templates[1], kind_v[:-1]) if one else (templates[0], kind_v)
        return template.format(type_needle_v=type_v, context=context, query=query), answers

    def _niah(self, task, args, length, index, new):
        template = (self.template(task), self.template(task, singular))
        incremental = 500 if args["type_haystack"] == "essay" else (25 if length >= 4096 else 5)
        build = lambda n, rng: self._niah_text(args, template, n, rng)[0]  # noqa: E731
        size = self._size((task, length), build, length - new, incremental)
        rng = self.rng(task, length, index)
        state = {}

        def one(n):
            state["text"], state["answer"] = self._niah_text(args, template, n, rng)
            return state["text"]

        self._shrink_to_fit(one, size, length - new, incremental)
        return state["text"], state["answer"], {}

    # --- variable_tracking.py -------------------------------------------------------------------
    @staticmethod
    def _chains(rng: random.Random, num_chains: int, num_hops: int, icl: bool):
        k, hops = (3, min(10, num_hops)) if icl else (5, num_hops)
        names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((hops + 1) * num_chains)]
        while len(set(names)) < num_chains * (hops + 1):
            names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
        variables, chains = [], []
        for i in range(0, len(names), hops + 1):
            group = names[i:i + hops + 1]
            variables.append(group)
            value = "12345" if icl else str(rng.randrange(10000, 99999))
            chains.append([f"VAR {group[0]} = {value}"] + [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(hops)])
        return variables, chains

    def _vt_text(self, args, template, size, rng, icl=False):
        variables, chains = self._chains(rng, args["num_chains"], args["num_hops"], icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE] * size
        for chain in chains:
            for j, at in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
                lines.insert(at + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        return template.format(context=context, query=value, num_v=args["num_hops"] + 1), variables[0]

    def _vt_example(self, args, length) -> str:
        """RULER's worked example: a 500-token sample, base template, with its answer appended."""
        if length not in self._vt_examples:
            fam = FAMILIES["variable_tracking"]
            template = fam.template + fam.answer_prefix
            build = lambda n, rng: self._vt_text(args, template, n, rng, icl=True)[0]  # noqa: E731
            size = self._size(("vt-example", length), build, 500, 5)
            rng = self.rng("vt-example", length)
            state = {}

            def one(n):
                state["text"], state["answer"] = self._vt_text(args, template, n, rng, icl=True)
                return state["text"]

            self._shrink_to_fit(one, size, 500, 5)
            self._vt_examples[length] = state["text"] + " " + " ".join(state["answer"]) + "\n"
        return self._vt_examples[length]

    def _vt(self, task, args, length, index, new):
        template, example = self.template(task), self._vt_example(args, length)
        incremental = 10 if length >= 4096 else 5
        build = lambda n, rng: self._vt_text(args, template, n, rng)[0]  # noqa: E731
        size = self._size((task, length), build, length - new, incremental, extra_tokens=self.count(example))
        rng = self.rng(task, length, index)
        anchor = FAMILIES["variable_tracking"].template[:20]
        state = {}

        def one(n):
            text, state["answer"] = self._vt_text(args, template, n, rng)
            cut = text.index(anchor)  # the example goes between the model template and the task
            state["text"] = text[:cut] + self._randomize_example(example, args["num_hops"], rng) + "\n" + text[cut:]
            return state["text"]

        self._shrink_to_fit(one, size, length - new, incremental)
        return state["text"], state["answer"], {}

    @staticmethod
    def _randomize_example(example: str, num_hops: int, rng: random.Random) -> str:
        for name in example.strip().split()[-num_hops - 1:]:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        return example.replace("12345", str(rng.randrange(10000, 99999)))

    # --- common_words_extraction.py -------------------------------------------------------------
    @functools.cached_property
    def cwe_words(self) -> list[str]:
        lists = wonderwords_lists()
        words = sorted(set(lists["noun"] + lists["adjective"] + lists["verb"]))
        random.Random(self.seed).shuffle(words)
        return words

    @functools.cached_property
    def cwe_more_words(self) -> list[str]:
        """For lists longer than wonderwords' (RULER: english_words.json): the books' words."""
        counts = Counter(re.findall(r"\b[a-z]{3,14}\b", " ".join(self.essay)))
        return sorted(set(self.cwe_words) | set(counts))

    def _cwe_text(self, args, template, length, size, rng):
        def example(n, common_repeats, uncommon_repeats):
            pool = self.cwe_words if n <= len(self.cwe_words) else self.cwe_more_words
            if n > len(pool):
                raise ValueError(f"cwe needs {n} distinct words; {len(pool)} are available")
            chosen = rng.sample(pool, n)
            common, uncommon = chosen[:args["num_cw"]], chosen[args["num_cw"]:]
            words = common * common_repeats + uncommon * uncommon_repeats
            rng.shuffle(words)
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), common

        if length < 4096:
            shots, (context, answer) = [example(20, 3, 1)], example(size, 6, 1)
        else:
            shots, (context, answer) = [example(40, 10, 3)], example(size, args["freq_cw"], args["freq_ucw"])
        shots_text = "\n".join(template.format(context=c, query="") + " " + " ".join(f"{i + 1}. {w}" for i, w in
                                                                                      enumerate(a)) for c, a in shots)
        return shots_text + "\n" + template.format(context=context, query=""), answer

    def _cwe(self, task, args, length, index, new):
        template = self.template(task)
        build = lambda n, rng: self._cwe_text(args, template, length, n, rng)[0]  # noqa: E731
        key = (task, length)
        if key not in self._sizes:  # RULER probes with 4096 words and searches up to twice the estimate
            rng = self.rng(task, length, "search")
            per_word = self.count(build(4096, rng)) / 4096
            lower, upper, best = 10, max(int(length // per_word) * 2, 20), None
            while lower <= upper:
                mid = (lower + upper) // 2
                if self.count(build(mid, rng)) <= length - new:
                    best, lower = mid, mid + 1
                else:
                    upper = mid - 1
            self._sizes[key] = best if best is not None else 10
        rng = self.rng(task, length, index)
        state = {}

        def one(n):
            state["text"], state["answer"] = self._cwe_text(args, template, length, n, rng)
            return state["text"]

        self._shrink_to_fit(one, self._sizes[key], length - new, 10)
        return state["text"], state["answer"], {}

    # --- freq_words_extraction.py ---------------------------------------------------------------
    def _fwe_text(self, template, vocab, num_words, alpha, order_seed):
        z = zeta(alpha)
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(num_words * k ** -alpha / z))]
        random.Random(order_seed).shuffle(words)
        return template.format(context=" ".join(words), query="")

    def _fwe_vocab(self, rng, size, word_length=6):
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=word_length)) for _ in range(size)]
        while len(set(vocab)) < size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=word_length)))
        vocab = sorted(set(vocab))
        rng.shuffle(vocab)
        vocab[0] = "..."  # RULER: the top-ranked word is noise
        return vocab

    def _fwe(self, task, args, length, index, new):
        template, alpha = self.template(task), args["alpha"]
        budget = length - new
        vocab_size, incremental = budget // 50, budget // 32
        if vocab_size < 4 or incremental < 1:
            raise ValueError("too short for four ranked words")
        key = (task, length)
        if key not in self._sizes:  # grow from budget/6 words by budget/32 until past the budget, step back
            rng = self.rng(task, length, "search")
            vocab, order = self._fwe_vocab(rng, vocab_size), rng.random()
            num = budget // 6
            while self.count(self._fwe_text(template, vocab, num, alpha, order)) < budget:
                num += incremental
            self._sizes[key] = num - incremental
        rng = self.rng(task, length, index)
        vocab, order = self._fwe_vocab(rng, vocab_size), rng.random()
        num = self._sizes[key]
        text = self._fwe_text(template, vocab, num, alpha, order)
        while self.count(text) > budget:
            num -= incremental
            text = self._fwe_text(template, vocab, num, alpha, order)
        return text, vocab[1:4], {}

    # --- qa.py ----------------------------------------------------------------------------------
    def _qa_data(self, task):
        if task not in self._qa:
            path = self.qa_files[task]
            if not Path(path).is_file():
                raise ValueError(f"{task}: no file at {path}")
            reader = read_squad if QA_DATASETS[task] == "squad" else read_hotpotqa
            try:
                self._qa[task] = reader(path)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{task}: {path} is not {QA_DATASETS[task]} JSON ({error!r})") from None
        return self._qa[task]

    def _qa_text(self, task, template, index, size, rng):
        qas, docs = self._qa_data(task)
        qa = qas[index % len(qas)]
        gold, more = qa["context"], qa.get("more_context", [])
        if size < len(docs):
            if size - len(gold) > len(more):
                taken = set(gold + more)
                others = [i for i in range(len(docs)) if i not in taken]
                chosen = gold + more + rng.sample(others, max(0, size - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, size - len(gold))
            chosen = [docs[i] for i in chosen]
        else:
            chosen = (docs * -(-size // len(docs)))[:size]
        rng.shuffle(chosen)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
        return template.format(context=context, query=qa["query"]), qa["outputs"]

    def _qa_task(self, task, args, length, index, new):
        template = self.template(task)
        build = lambda n, rng: self._qa_text(task, template, 0, n, rng)[0]  # noqa: E731
        size = self._size((task, length), build, length - new, 10)
        rng = self.rng(task, length, index)
        state = {}

        def one(n):
            state["text"], state["answer"] = self._qa_text(task, template, index, n, rng)
            return state["text"]

        self._shrink_to_fit(one, size, length - new, 10)
        return state["text"], state["answer"], {}


__all__ = ["RulerGenerator", "split_sentences", "singular", "zeta", "read_squad", "read_hotpotqa", "NEEDLE",
           "NOISE", "DEPTHS"]
