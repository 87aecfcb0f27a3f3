"""``prepare-data``: the trained sentencepiece tokenizer as an HF folder, needle documents mixed
into a corpus, embedded books by name, the manifest; and the pre-training mode of the trainer
config and sampler (``rope: null``, every micro-batch short)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longrope2.data.mixed import DocumentStore, MixedWindowSampler
from longrope2.data.needle import INSTRUCTION, QUESTION
from longrope2.data.prepare import PrepareConfig, run_prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prep")
    config = PrepareConfig(output=str(folder / "data"), tokenizer=str(folder / "tok"), inputs=["embedded:botchan"],
                           train_tokenizer=600, min_doc_tokens=200, max_doc_tokens=200, needle_fraction=0.3, seed=3)
    stats, vocab, _ = run_prepare(config, progress=False)
    return folder, config, stats, vocab


def test_trained_tokenizer_is_an_hf_folder_equal_to_sentencepiece(prepared):
    """transformers' AutoTokenizer on the written folder encodes exactly as the sentencepiece
    library's own processor on the model file (plus <s>), and digits are single tokens."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder, _, _, vocab = prepared
    hf = AutoTokenizer.from_pretrained(folder / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tok" / "tokenizer.model"))
    text = "One of the special magic numbers for quiet-meadow is: 6716097. The sun rose over Botchan's school."
    assert vocab == len(hf) == sp.get_piece_size() == 600
    assert hf(text).input_ids == [sp.bos_id()] + sp.encode(text)
    digits = hf("6716097", add_special_tokens=False).input_ids
    assert [hf.convert_ids_to_tokens(i).lstrip("▁") for i in digits if hf.convert_ids_to_tokens(i) != "▁"] == list("6716097")


def test_tokenizer_training_is_deterministic(prepared, tmp_path):
    from longrope2.data.books import embedded_book
    from longrope2.data.tokenize import train_sentencepiece

    folder, *_ = prepared
    again = train_sentencepiece([embedded_book("botchan").text], 600, tmp_path / "tok")
    assert (again / "tokenizer.model").read_bytes() == (folder / "tok" / "tokenizer.model").read_bytes()


def test_needle_documents_in_the_corpus(prepared):
    """About the configured fraction of documents are needle documents; each keeps the length of
    the document it replaced, starts with <s> and the instruction, and ends with the question and
    the 7-digit number of its needle."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    folder, config, stats, _ = prepared
    tok = AutoTokenizer.from_pretrained(folder / "tok")
    data = IndexedDataset(config.output)
    texts = [tok.decode(np.asarray(data[i]).tolist(), skip_special_tokens=True) for i in range(len(data))]
    needles = [i for i, t in enumerate(texts) if t.startswith(INSTRUCTION)]
    assert len(needles) == stats.needle_documents
    assert 0.2 < len(needles) / len(data) < 0.4
    lengths = np.asarray(data.sequence_lengths)
    assert lengths[:-1].max() == 200 and (lengths[needles] == 200).all()  # BOS counted in the length
    for i in needles:
        text = texts[i]
        key = text.split("One of the special magic numbers for ")[1].split(" is: ")[0]
        value = text.split(f"{key} is: ")[1][:7]
        assert value.isdigit()
        assert text.endswith(QUESTION.format(key=key) + " " + value)
        assert int(data[i][0]) == tok.bos_token_id


def test_manifest_records_the_dataset(prepared):
    _, config, stats, _ = prepared
    manifest = json.loads(Path(f"{config.output}.json").read_text())
    assert manifest["documents"] == stats.documents and manifest["tokens"] == stats.tokens
    assert manifest["needle_documents"] == stats.needle_documents and manifest["config"]["inputs"] == ["embedded:botchan"]


def test_embedded_book_specs():
    from longrope2.data.books import embedded_book, load_text_files

    books = load_text_files(["embedded:persuasion", "embedded:Moby Dick"])
    assert [b.title for b in books] == ["Persuasion", "Moby Dick"]
    assert books[0].text == embedded_book("Persuasion").text
    with pytest.raises(ValueError, match="no embedded book 'nope'; known: emma"):
        embedded_book("nope")


def test_cli_prepare_data_bad_input_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "longrope2.cli", "prepare-data", "--output", str(tmp_path / "d"),
                           "--tokenizer", str(tmp_path / "t"), "--train-tokenizer", "600", "--needle-fraction", "1.5",
                           "embedded:botchan"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == "longrope2 prepare-data: error: needle_fraction must be in [0, 1], got 1.5"
    assert not any(tmp_path.iterdir())


# --- pre-training mode -----------------------------------------------------------------------------


def test_all_short_sampler_may_pack_into_the_window():
    """short_fraction 1 (pre-training): micro-batches of at most the window, packed documents
    with restarting positions; any short_fraction < 1 still needs seq_length > window."""
    store = DocumentStore.from_arrays([list(range(10, 10 + n)) for n in (5, 8, 3, 8, 8)])
    sampler = MixedWindowSampler(store, seq_length=8, original_window=8, short_fraction=1.0, seed=0)
    batch = sampler[0]
    assert batch.kind == "short" and batch.tokens.shape == (1, 8) and batch.max_seqlen <= 8
    with pytest.raises(ValueError, match="must exceed the original window 8"):
        MixedWindowSampler(store, seq_length=8, original_window=8, short_fraction=0.5, seed=0)


def test_rope_null_is_pretraining_only(tmp_path):
    from longrope2.train.config import TrainConfig

    from longrope2.train.config import DataConfig

    ok = TrainConfig(model="tiny", rope=None, output_dir=str(tmp_path), seq_length=256, global_batch_size=2,
                     train_steps=1, data=DataConfig(short_fraction=1.0))
    dims, model_cfg, scaling = ok.check(world_size=2)
    assert scaling is None and dims.dp == 2
    bad = TrainConfig(model="tiny", rope=None, output_dir=str(tmp_path), seq_length=512, global_batch_size=2,
                      train_steps=1, data=DataConfig(short_fraction=0.5))
    with pytest.raises(ValueError, match="rope: null .* needs data.short_fraction 1.0"):
        bad.check(world_size=2)
