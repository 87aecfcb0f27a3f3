"""RULER as RULER writes it: each of our 13 generators against RULER's own templates (quoted below
from NVIDIA/RULER as data, not from our output), RULER-format folders read and scored as RULER's
scoring code does, and RULER's chat-template placement."""

import json
import re

import pytest

from eval_fixtures import books, save_tiny, tokenizer, write_books
from longrope2 import configs
from longrope2.data import tokenize
from longrope2.eval.ruler import (RULER_TASKS, ChatWrap, RulerRecord, read_task_file, sample_score, task_score,
                                  to_sample, write_task_file)
from longrope2.eval.ruler_gen import RulerGenerator, wonderwords_lists

# NVIDIA/RULER scripts/data/synthetic/constants.py: TASKS[family] = (template, answer_prefix, tokens_to_generate)
RULER_CONSTANTS = {
    "niah": ("""Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?""",  # noqa: E501
             """ The special magic {type_needle_v} for {query} mentioned in the provided text are""", 128),
    "variable_tracking": ("""Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.""",  # noqa: E501
                          """ Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: """, 30),  # noqa: E501
    "common_words_extraction": ("""Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?""",  # noqa: E501
                                """ Answer: The top 10 words that appear most often in the list are:""", 120),
    "freq_words_extraction": ("""Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?""",  # noqa: E501
                              """ Answer: According to the coded text above, the three most frequently appeared words are:""", 50),  # noqa: E501
    "qa": ("""Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}""",  # noqa: E501
           """ Answer:""", 32),
}
# NVIDIA/RULER scripts/synthetic.yaml: task -> (family, args)
RULER_YAML = {
    "niah_single_1": ("niah", dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers", k=1, v=1, q=1)),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", k=1, v=1, q=1)),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids", k=1, v=1, q=1)),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", k=4, v=1, q=1)),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers", k=1, v=1, q=1)),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids", k=1, v=1, q=1)),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", k=1, v=4, q=1)),
    "niah_multiquery": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", k=1, v=1, q=4)),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}
# niah.py: the needle, the noise haystack, and the rewording when one key and one value are asked
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
RULER_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def ruler_singular(template):  # niah.py, as RULER writes it
    template = template.replace('Some', 'A')
    template = template.replace('are all', 'is')
    template = template.replace('are', 'is')
    template = template.replace('answers', 'answer')
    return template


# template.py: RULER's Phi3 model template
RULER_PHI3 = "<|user|>\n{task_template}<|end|>\n<|assistant|>\n"
KIND = {"numbers": r"\d{7}", "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        "words": r"[a-z]+(?:-[a-z]+)*-[a-z]+"}
LENGTH = 2048


def count(text):
    return len(tokenizer()(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    paragraphs = [{"context": f"Paragraph {i} says the river {i} is called Name{i}.",
                   "qas": [{"question": f"What is river {i} called?", "is_impossible": False,
                            "answers": [{"text": f"Name{i}"}, {"text": f"Name{i}."}]},
                           {"question": "Unanswerable?", "is_impossible": True, "answers": []}]} for i in range(40)]
    squad = root / "squad.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": paragraphs[:20]}, {"paragraphs": paragraphs[20:]}]}))
    hotpot = root / "hotpot.json"
    hotpot.write_text(json.dumps([{"question": f"Who wrote book {i}?", "answer": f"Author{i}",
                                   "context": [[f"Book {i}", [f"Book {i} was written ", f"by Author{i}."]],
                                               [f"Other {i}", [f"Other {i} is unrelated."]]]} for i in range(60)]))
    return {"qa_1": str(squad), "qa_2": str(hotpot)}


@pytest.fixture(scope="module")
def generator(qa_files):
    return RulerGenerator(count, list(books()), seed=5, qa_files=qa_files)


def split_template(template, prefix, **values):
    """RULER's template + answer prefix around the context: (head, tail) with the fields filled."""
    head, tail = (template + prefix).split("{context}")
    return head.format(**values), tail.format(**values)


@pytest.mark.parametrize("task", RULER_TASKS)
def test_each_task_is_rulers_template_and_length_rule(generator, task):
    family, args = RULER_YAML[task]
    template, prefix, new = RULER_CONSTANTS[family]
    record = generator.record(task, LENGTH, 0)
    again = RulerGenerator(count, list(books()), seed=5, qa_files=generator.qa_files).record(task, LENGTH, 0)
    assert record == again and record != generator.record(task, LENGTH, 1)
    full = record.input + record.answer_prefix
    # RULER's length rule: prompt tokens (no BOS) + tokens to generate, within the length
    assert record.length == count(full) + new <= LENGTH
    assert full.rfind(prefix.split("{")[0][:10]) == len(record.input)  # the prefix starts where RULER cuts

    if family == "niah":
        one = args["q"] * args["v"] == 1
        kind_v = args["type_needle_v"]
        tpl, pre = (ruler_singular(template), ruler_singular(prefix)) if one else (template, prefix)
        type_v = kind_v[:-1] if one else kind_v
        query = re.fullmatch(pre.format(type_needle_v=type_v, query="(.+)"), record.answer_prefix).group(1)
        head, tail = split_template(tpl, pre, type_needle_v=type_v, query=query)
        assert full.startswith(head) and full.endswith(tail)
        context = full[len(head):-len(tail)]
        needle = RULER_NEEDLE.format(type_needle_v=kind_v, key=f"({KIND[args['type_needle_k']]})",
                                     value=f"({KIND[kind_v]})")  # plural in the needle, as RULER formats it
        needles = re.findall(needle.replace(".", r"\."), context)
        keys = query.split(", and ") if args["q"] == 1 else re.split(r", (?:and )?", query)
        assert len(keys) == args["q"]
        wanted = [value for key, value in needles if key in keys]
        assert sorted(record.outputs) == sorted(wanted) and len(wanted) == args["q"] * args["v"]
        if args["type_needle_k"] == "words":
            adjectives, nouns = set(wonderwords_lists()["adjective"]), set(wonderwords_lists()["noun"])
            assert all(any(k[:i] in adjectives and k[i + 1:] in nouns for i in range(len(k)) if k[i] == "-")
                       for k in keys)
        if args["type_haystack"] == "noise":  # one sentence per line, the needles among them
            lines = context.split("\n")
            assert {line for line in lines if not re.fullmatch(needle.replace(".", r"\."), line)} == {RULER_NOISE}
        elif args["type_haystack"] == "needle":  # a haystack of other keys' needles, one per line
            assert all(re.fullmatch(needle.replace(".", r"\."), line) for line in context.split("\n"))
            assert len(needles) > 10
        else:  # the essay (books) from its first word, needles between sentences
            text = re.sub(needle.replace(".", r"\.") + " ?", "", context.strip())
            words = re.sub(r"\s+", " ", " ".join(t for _, t in books())).split(" ")
            assert text.split(" ")[:20] == words[:20]
            assert len(needles) == max(args["k"], args["q"]) * args["v"]
    elif family == "variable_tracking":
        # the worked example (3-letter variables) first, then the task; both RULER's template
        example_head = template.split("{context}")[0]
        assert full.startswith(example_head) and full.count(example_head) == 2
        example, task_part = full[:full.index(example_head, 1)], full[full.index(example_head, 1):]
        assert example.endswith("\n\n")  # RULER: example + " " + answer + "\n", then "\n" before the task
        example_vars = example.rstrip("\n").split(", they are:  ")[1].split(" ")  # two spaces, as RULER joins
        assert len(example_vars) == 5 and all(re.fullmatch("[A-Z]{3}", v) for v in example_vars)
        value = re.search(r"assigned the value (\d{5}) in the text above", task_part).group(1)
        head, tail = split_template(template, prefix, num_v=5, query=value)
        assert task_part.startswith(head) and task_part.endswith(tail)
        lines = task_part[len(head):-len(tail)].split("\n")
        chain = [line for line in lines if line != RULER_NOISE]
        names = record.outputs
        assert len(names) == 5 and all(re.fullmatch("[A-Z]{5}", n) for n in names)
        assert chain == [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    elif family == "common_words_extraction":
        shot, main = full.split("\n" + template.split("{context}")[0], 1)
        main = template.split("{context}")[0] + main
        head, tail = split_template(template, prefix)
        assert shot.startswith(head) and main.startswith(head) and main.endswith(tail)
        items = main[len(head):-len(tail)].split(" ")
        words = [w for i, w in enumerate(items) if i % 2 == 1]
        assert items[0::2] == [f"{i + 1}." for i in range(len(words))]
        counts = {w: words.count(w) for w in words}
        # below 4k RULER uses 6 and 1 repeats (30 and 3 from 4k), and a 20-word worked example
        assert {counts[w] for w in record.outputs} == {6} and set(counts.values()) == {6, 1}
        # the worked example: a 20-word list (3 and 1 repeats), then its own answer "1. w 2. w ... 10. w"
        shot_list, shot_answer = shot[len(head):].split(tail)
        shot_words = shot_list.split(" ")[1::2]
        answer = shot_answer.strip().split(" ")
        assert answer[0::2] == [f"{i + 1}." for i in range(10)]
        assert sorted({shot_words.count(w) for w in answer[1::2]}) == [3] and len(shot_words) == 10 * 3 + 10
    elif family == "freq_words_extraction":
        head, tail = split_template(template, prefix)
        assert full.startswith(head) and full.endswith(tail)
        words = full[len(head):-len(tail)].split(" ")
        ranked = sorted(set(words), key=lambda w: -words.count(w))
        assert ranked[0] == "..." and ranked[1:4] == record.outputs  # RULER's noise word is three dots
        assert all(re.fullmatch("[a-z]{6}", w) for w in ranked[1:])
    else:  # qa
        question = re.search(r"\n\nQuestion: (.+)$", record.input).group(1)
        head, tail = split_template(template, prefix, query=question)
        assert full.startswith(head) and full.endswith(tail)
        documents = full[len(head):-len(tail)].split("\n\n")
        assert [d.split(":\n")[0] for d in documents] == [f"Document {i + 1}" for i in range(len(documents))]
        gold = record.outputs[0]
        assert any(gold in d for d in documents) and len(documents) >= 10


def test_singular_wording_golden(generator):
    """RULER's singular question and prefix, written out (niah.py's rewording of constants.py)."""
    record = generator.record("niah_single_1", LENGTH, 3)
    key = re.search(r"for (\S+) mentioned", record.answer_prefix).group(1)
    assert record.input.startswith("A special magic number is hidden within the following text. Make sure to "
                                   "memorize it. I will quiz you about the number afterwards.\n")
    assert record.input.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert record.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert f"One of the special magic numbers for {key} is: {record.outputs[0]}." in record.input
    multi = generator.record("niah_multivalue", LENGTH, 0)
    assert multi.input.startswith("Some special magic numbers are hidden") and multi.answer_prefix.endswith(" are")


def test_qa_skipped_without_its_data_and_short_lengths_refused():
    bare = RulerGenerator(count, list(books()))
    assert "ruler.squad" in bare.available("qa_1") and "ruler.hotpotqa" in bare.available("qa_2")
    with pytest.raises(ValueError, match="SQuAD"):
        bare.record("qa_1", LENGTH, 0)
    with pytest.raises(ValueError, match="niah_single_2 at 600 tokens"):
        bare.record("niah_single_2", 600, 0)  # RULER's essay step is 500 words


def test_chat_template_placed_as_rulers_model_templates(generator):
    """The tokenizer's chat turn around the task template, the answer prefix after the assistant
    header: with RULER's Phi3 template as the tokenizer's, the prompt is RULER's."""
    tok = tokenizer()
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}{{ '<|assistant|>\n' }}"
    try:
        chat = ChatWrap.from_tokenizer(tok)
    finally:
        tok.chat_template = saved
    head, tail = RULER_PHI3.split("{task_template}")
    assert (chat.prefix, chat.suffix) == (head, tail)
    chatty = RulerGenerator(count, list(books()), seed=5, chat=chat)
    record = chatty.record("niah_single_1", LENGTH, 0)
    assert record.input.startswith(head + "A special magic number is hidden") and record.input.endswith(
        "mentioned in the provided text?" + tail)
    assert record.answer_prefix.startswith(" The special magic number for")
    vt = chatty.record("vt", LENGTH, 0)  # the worked example goes inside the turn, before the task
    assert vt.input.startswith(head + "Memorize and track") and vt.input.count(head) == 1
    with pytest.raises(ValueError, match="no chat template"):
        ChatWrap.from_tokenizer(tok if not saved else None)


def ruler_postprocess(predict_str):  # RULER scripts/eval/evaluate.py::postprocess_pred
    predict_str = predict_str.strip()
    np_pattern = re.compile(r'[\x00-\x1f]')
    predict_str = np_pattern.sub('\n', predict_str).strip()
    return predict_str


def ruler_string_match_all(preds, refs):  # RULER scripts/eval/synthetic/constants.py
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref) for pred, ref in zip(preds, refs)]) / len(preds) * 100  # noqa: E501
    return round(score, 2)


def ruler_string_match_part(preds, refs):  # RULER scripts/eval/synthetic/constants.py
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)]) / len(preds) * 100  # noqa: E501
    return round(score, 2)


def test_scoring_is_rulers_on_hand_predictions():
    preds = ["  The numbers are 1234567 and\x007654321.  ", "apple", "", "NUMBER 1234567"]
    refs = [["1234567", "7654321"], ["Apple", "pear", "plum"], ["x"], ["1234567", "2"]]
    ours = task_score([sample_score("niah_multivalue", p, r) for p, r in zip(preds, refs)])
    assert ours == ruler_string_match_all([ruler_postprocess(p) for p in preds], refs) == 58.33  # 1, 1/3, 0, 1
    ours = task_score([sample_score("qa_2", p, r) for p, r in zip(preds, refs)])
    assert ours == ruler_string_match_part([ruler_postprocess(p) for p in preds], refs) == 75.0


def write_ruler_folder(root):
    """A RULER-format folder as prepare.py writes it: NIAH's index repeats (the answer offset)."""
    niah = [{"index": 57, "input": f"Some text {i}. One of the special magic numbers for k{i} is: {1000000 + i}.\n"
                                   f"What is the special magic number for k{i} mentioned in the provided text?",
             "outputs": [str(1000000 + i)], "length": 40, "length_w_model_temp": 40,
             "answer_prefix": f" The special magic number for k{i} mentioned in the provided text is",
             "token_position_answer": 3} for i in range(3)]
    qa = [{"index": i, "input": f"Document 1:\nThe capital is Town{i}.\n\nQuestion: Which town?",
           "outputs": [f"Town{i}", f"town {i}"], "length": 30, "answer_prefix": " Answer:"} for i in range(2)]
    for task, rows in (("niah_single_1", niah), ("qa_1", qa)):
        (root / task).mkdir(parents=True)
        (root / task / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return niah, qa


def test_ruler_folder_read_and_scored_as_ruler_scores_it(tmp_path):
    """A RULER-format folder through ``longrope2 eval`` on the tiny model: every line a sample (by
    line, though NIAH's index repeats), prompt = input + answer_prefix, RULER's tokens to
    generate, and task scores equal to RULER's scoring code on the same predictions."""
    from longrope2.eval.config import EvalConfig
    from longrope2.eval.run import run_eval

    niah, qa = write_ruler_folder(tmp_path / "data" / "1024")
    records = read_task_file(tmp_path / "data" / "1024" / "niah_single_1" / "validation.jsonl")
    assert [r.outputs for r in records] == [n["outputs"] for n in niah]
    encode = tokenize.from_hf(tokenizer()).encode
    sample = to_sample(records[1], "niah_single_1", 1024, 1, encode, None)
    assert sample.prompt == encode(niah[1]["input"] + niah[1]["answer_prefix"]) and sample.max_new_tokens == 128
    assert to_sample(records[1], "niah_single_1", 1024, 1, encode, 7).prompt[0] == 7  # the tokenizer's BOS
    config = configs.from_dict(EvalConfig, {
        "model": str(save_tiny(tmp_path / "model")), "output_dir": str(tmp_path / "out"), "ropes": ["original"],
        "lengths": [1024], "books": write_books(tmp_path / "books"), "batch_size": 2,
        "ruler": {"samples": 5, "data_dir": str(tmp_path / "data" / "{length}"), "tasks": ["niah_single_1", "qa_1", "vt"],
                  "max_new_tokens": {"niah_single_1": 6}}})
    summary = run_eval(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    by_task = {t: sorted((r for r in lines if r["task"] == t), key=lambda r: r["index"]) for t in ("niah_single_1", "qa_1")}
    assert [r["index"] for r in by_task["niah_single_1"]] == [0, 1, 2] and len(by_task["qa_1"]) == 2
    assert [r["references"] for r in by_task["qa_1"]] == [q["outputs"] for q in qa]
    assert by_task["niah_single_1"][0]["prompt_tokens"] == len(encode(niah[0]["input"] + niah[0]["answer_prefix"]))
    metrics = summary["metrics"]
    for task, ruler_metric, refs in (("niah_single_1", ruler_string_match_all, [n["outputs"] for n in niah]),
                                     ("qa_1", ruler_string_match_part, [q["outputs"] for q in qa])):
        preds = [ruler_postprocess(r["prediction"]) for r in by_task[task]]
        assert metrics[task]["original"]["1024"]["accuracy"] == ruler_metric(preds, refs)
    average = summary["ruler_average"]["original"]["1024"]
    assert average["task_names"] == ["niah_single_1", "qa_1"]
    assert average["accuracy"] == round((metrics["niah_single_1"]["original"]["1024"]["accuracy"] +
                                         metrics["qa_1"]["original"]["1024"]["accuracy"]) / 2, 2)
    assert any("vt at 1024: skipped: no RULER data file" in s for s in summary["skipped"])
    assert any("niah_single_1 at 1024: 3 samples only" in s for s in summary["skipped"])


def test_written_files_are_read_back(tmp_path, generator):
    records = [generator.record("vt", LENGTH, i) for i in range(2)]
    write_task_file(tmp_path / "vt" / "validation.jsonl", records)
    raw = [json.loads(line) for line in (tmp_path / "vt" / "validation.jsonl").read_text().splitlines()]
    assert set(raw[0]) >= {"index", "input", "outputs", "length", "answer_prefix"} and raw[1]["index"] == 1
    assert [(r.input, r.outputs, r.answer_prefix, r.length) for r in read_task_file(tmp_path / "vt" / "validation.jsonl")] \
        == [(r.input, r.outputs, r.answer_prefix, r.length) for r in records]


@pytest.mark.parametrize("line, message", [("{", "not JSON"), ('{"outputs": ["a"]}', "string 'input'"),
                                           ('{"input": "x", "outputs": []}', "non-empty list")])
def test_bad_ruler_lines_are_named(tmp_path, line, message):
    path = tmp_path / "validation.jsonl"
    path.write_text('{"input": "ok", "outputs": ["a"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"validation.jsonl:2: .*{message}"):
        read_task_file(path)


def test_record_fields():
    record = RulerRecord("in", ["a"], " Answer:", 12)
    assert record.to_json(3) == {"index": 3, "input": "in", "outputs": ["a"], "length": 12, "length_w_model_temp": 12,
                                 "answer_prefix": " Answer:"}
