"""R lazy-load databases (longrope2.data.r_lazyload, on PyPI's rdata) and the real book corpora (longrope2.data.books).

Real-file tests download two Debian packages (~2.3 MB, apt-get) and the sentencepiece sdist
(~3.8 MB, pip) once into pytest's cache (``.pytest_cache``) or ``$LONGROPE2_BOOKS_DIR``; they
skip with the reason when apt-get is absent or the download fails. The rest are offline.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from longrope2.data import books as books_mod
from longrope2.data.books import (
    Book,
    BooksError,
    join_paragraphs,
    load_books,
    load_text_files,
    strip_gutenberg,
    unwrap_lines,
)
from longrope2.data.r_lazyload import LazyLoadDB, decompress_record

AUSTEN_NAMES = [
    "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
    "sensesensibility",
]


# ==========================================================================================
# Fixtures: real files, fetched once and cached
# ==========================================================================================
def _cache_dir(request, name: str) -> Path:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir(name))
    return request.getfixturevalue("tmp_path_factory").mktemp(name)


@pytest.fixture(scope="session")
def deb_root(request) -> Path:
    """Unpacked r-cran-janeaustenr + r-cran-tokenizers (``dpkg-deb -x`` tree)."""
    base = _cache_dir(request, "longrope2_debs")
    root, done = base / "root", base / "complete"
    if not done.exists():
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            pytest.skip("needs apt-get and dpkg-deb (Debian/Ubuntu) to download the R packages")
        shutil.rmtree(base / "debs", ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        try:
            books_mod.fetch_debian_packages(books_mod.DEBIAN_PACKAGES, base, progress=False)
        except BooksError as e:
            pytest.skip(f"could not download the Debian packages (network?): {e}")
        done.write_text("ok")
    return root


@pytest.fixture(scope="session")
def rlib(deb_root) -> Path:
    return next(deb_root.glob("usr/lib/R/*/janeaustenr")).parent


@pytest.fixture(scope="session")
def books_cache(request) -> Path:
    """One books folder for the session (pytest's cache, or one temporary folder when the
    cache plugin is off), so a second load can find the first one's files."""
    import os

    return Path(os.environ.get("LONGROPE2_BOOKS_DIR") or _cache_dir(request, "longrope2_books"))


@pytest.fixture(scope="session")
def real_books(books_cache) -> list[Book]:
    cache = books_cache
    if books_mod._read_cache(Path(cache)) is None and shutil.which("apt-get") is None:
        pytest.skip("needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch the books")
    try:
        return load_books(cache, progress=False)
    except BooksError as e:
        pytest.skip(f"could not fetch the books (network?): {e}")


# ==========================================================================================
# the lazy-load databases of the real Debian files (PyPI's rdata reads each record)
# ==========================================================================================
def test_real_lazyload_index(rlib):
    db = LazyLoadDB(rlib / "janeaustenr" / "data")
    assert db.names() == AUSTEN_NAMES
    assert db.compressed == 1
    offsets = [db.variables[n] for n in AUSTEN_NAMES]
    assert offsets[0][0] == 0
    for (o1, n1), (o2, _) in zip(offsets, offsets[1:]):  # records are contiguous
        assert o1 + n1 == o2
    assert LazyLoadDB(rlib / "tokenizers" / "data" / "Rdata.rdb").names() == ["mobydick"]


def test_real_emma_lines(rlib):
    emma = LazyLoadDB(rlib / "janeaustenr" / "data")["emma"]
    assert len(emma) == 16235 and all(isinstance(x, str) for x in emma)
    nonempty = [x for x in emma if x]
    assert nonempty[:4] == ["EMMA", "By Jane Austen", "VOLUME I", "CHAPTER I"]
    assert nonempty[4] == "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"
    assert emma[1] == ""  # blank lines between paragraphs


def test_real_austen_novels(rlib):
    data = LazyLoadDB(rlib / "janeaustenr" / "data")
    pp = data["prideprejudice"]
    assert pp[0] == "PRIDE AND PREJUDICE"
    assert any(line.startswith("It is a truth universally acknowledged") for line in pp)
    for name in AUSTEN_NAMES:
        lines = data[name]
        assert len(lines) > 7000 and sum(map(len, lines)) > 400_000


def test_real_mobydick(rlib):
    md = LazyLoadDB(rlib / "tokenizers" / "data")["mobydick"]
    assert len(md) == 1
    assert "Call me Ishmael." in md[0] and len(md[0]) > 1_200_000


def test_unknown_name_and_missing_files(rlib, tmp_path):
    db = LazyLoadDB(rlib / "janeaustenr" / "data")
    with pytest.raises(KeyError, match="has: emma, mansfieldpark"):
        db["nope"]
    with pytest.raises(FileNotFoundError, match="Rdata.rdb"):
        LazyLoadDB(tmp_path)


@pytest.mark.parametrize("compressed, tag, compress", [(1, b"", zlib.compress), (2, b"2", bz2.compress),
                                                        (3, b"Z", lzma.compress), (3, b"0", bytes)])
def test_record_framing_of_every_compression_method(rlib, compressed, tag, compress):
    """R's record framing (4-byte length, then zlib, or a method tag and the data) around the
    real Emma record: every method gives back the same serialization."""
    db = LazyLoadDB(rlib / "janeaustenr" / "data")
    offset, length = db.variables["emma"]
    record = (rlib / "janeaustenr" / "data" / "Rdata.rdb").read_bytes()[offset:offset + length]
    payload = decompress_record(record, 1)
    assert payload[:2] == b"X\n"  # R's XDR serialization
    framed = struct.pack(">i", len(payload)) + tag + compress(payload)
    assert decompress_record(framed, compressed) == payload
    with pytest.raises(ValueError, match="expected 999 bytes"):
        decompress_record(struct.pack(">i", 999) + tag + compress(payload), compressed)
    with pytest.raises(ValueError, match="corrupt|compression tag"):
        decompress_record(struct.pack(">i", len(payload)) + b"Q" + b"not compressed data", compressed)

# ==========================================================================================
# the 8 books
# ==========================================================================================
def test_books_real_content(real_books):
    by_title = {b.title: b for b in real_books}
    assert len(real_books) == 8
    assert set(by_title) == {
        "Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice",
        "Sense and Sensibility", "Moby Dick", "Botchan",
    }
    for b in real_books:
        assert len(b.text) > 100_000, b
        assert "\r" not in b.text and "\ufeff" not in b.text
        assert "PROJECT GUTENBERG" not in b.text.upper().replace("PROJECT GUTENBERG'S ARCHIVES", "")
    assert by_title["Emma"].text.startswith("EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\n")
    # sentences that span wrapped lines in the sources come out joined
    assert ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife.") in by_title["Pride and Prejudice"].text
    moby = by_title["Moby Dick"].text
    assert "Call me Ishmael. Some years ago--never mind how long precisely--" in moby
    assert ("Because of an hereditary recklessness, I have been playing always a losing game "
            "since my childhood.") in by_title["Botchan"].text
    assert by_title["Botchan"].source.startswith("pypi:sentencepiece==")
    assert by_title["Persuasion"].source.startswith("debian:r-cran-janeaustenr=")


def test_books_second_load_uses_cache(real_books, books_cache, monkeypatch):
    cache = books_cache

    def no_network(*a, **k):
        raise AssertionError("load_books fetched although the cache is complete")

    monkeypatch.setattr(books_mod, "fetch_books", no_network)
    again = load_books(cache, progress=False)
    assert [(b.title, b.text) for b in again] == [(b.title, b.text) for b in real_books]
    assert (Path(cache) / "emma.txt").read_text(encoding="utf-8") == again[0].text



# ==========================================================================================
# text clean-up and user files
# ==========================================================================================
def test_join_paragraphs():
    lines = ["TITLE", "", "", "Some wrapped", "prose with a sea-", "gudgeon and a dash--",
             "here.", "", "    Verse line one,", "    verse line two.", "", ""]
    assert join_paragraphs(lines) == (
        "TITLE\n\nSome wrapped prose with a sea-gudgeon and a dash--here.\n\n"
        "    Verse line one,\n    verse line two.\n"
    )


def test_unwrap_lines_short_line_ends_paragraph():
    long = "x" * 70
    text = unwrap_lines(["CHAPTER I", long, long, "end of para.", long, "last."])
    assert text == f"CHAPTER I\n\n{long} {long} end of para.\n\n{long} last.\n"


def test_strip_gutenberg():
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG "
           "EBOOK X ***\r\n\r\nProduced by Someone\r\n\r\nX\r\n\r\nBody text.\r\n\r\n"
           "End of Project Gutenberg's X\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "licence...\r\n")
    assert strip_gutenberg(raw) == "X\n\nBody text.\n"
    assert strip_gutenberg("plain\ntext") == "plain\ntext\n"


def test_load_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("*** START OF THE PROJECT GUTENBERG EBOOK B ***\nbody B\n"
                                    "*** END OF THE PROJECT GUTENBERG EBOOK B ***\n")
    (tmp_path / "a.txt").write_bytes("caf\xe9 latin-1\n".encode("latin-1"))
    books = load_text_files(tmp_path)
    assert [b.title for b in books] == ["a", "b"]
    assert books[0].text == "café latin-1\n" and books[1].text == "body B\n"
    assert books[1].source.startswith("file:")
    one = load_text_files(str(tmp_path / "b.txt"), strip_boilerplate=False)
    assert "START OF" in one[0].text
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_files([tmp_path / "a.txt", tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_text_files(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_text_files(tmp_path / "blank.txt")


def test_fetch_without_apt_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(books_mod.shutil, "which", lambda name: None)
    with pytest.raises(BooksError, match=r"apt-get.*Debian/Ubuntu.*load_text_files"):
        books_mod.fetch_books(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "books.json").exists()


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGROPE2_BOOKS_DIR", str(tmp_path / "bk"))
    assert books_mod.default_cache_dir() == tmp_path / "bk"
    monkeypatch.delenv("LONGROPE2_BOOKS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert books_mod.default_cache_dir() == tmp_path / "xdg" / "longrope2" / "books"
