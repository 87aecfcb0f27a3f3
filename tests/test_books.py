"""R data reader (longrope2.data.rdata) and the real book corpora (longrope2.data.books).

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
from longrope2.data.rdata import (
    LazyLoadDB,
    RDataError,
    RPersistentRef,
    RSymbol,
    RVector,
    as_data_frame,
    decompress_record,
    is_data_frame,
    read_rds,
    unserialize,
)

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
# rdata on the real Debian files
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
    assert isinstance(emma, RVector) and emma.rtype == "character"
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
        assert lines.rtype == "character" and len(lines) > 7000
        assert sum(map(len, lines)) > 400_000


def test_real_mobydick(rlib):
    md = LazyLoadDB(rlib / "tokenizers" / "data")["mobydick"]
    assert md.rtype == "character" and len(md) == 1
    assert md.attributes["names"] == ["mobydick"]  # a named character vector
    assert "Call me Ishmael." in md[0] and len(md[0]) > 1_200_000


def test_real_data_frame_rds(rlib):
    """Meta/Rd.rds of an installed package is a real data frame (list columns included)."""
    rd = read_rds(rlib / "janeaustenr" / "Meta" / "Rd.rds")
    assert is_data_frame(rd)
    assert rd.attributes["row.names"] == [None, -8]  # compact row names c(NA, -8L)
    df = as_data_frame(rd)
    assert list(df)[:4] == ["File", "Name", "Type", "Title"]
    assert "emma" in df["Name"] and "austen_books" in df["Name"]
    assert all(len(col) == 8 for col in df.values())
    assert df["Aliases"][df["Name"].index("emma")] == ["emma"]
    matrix = read_rds(rlib / "tokenizers" / "Meta" / "data.rds")
    assert matrix.attributes["dim"] == [1, 2]
    assert list(matrix) == ["mobydick", "The text of Moby Dick"]


def test_real_code_db_bytecode_is_refused(rlib):
    db = LazyLoadDB(rlib / "janeaustenr" / "R" / "janeaustenr")
    assert db[".packageName"] == ["janeaustenr"]
    assert "austen_books" in db.names()
    with pytest.raises(RDataError, match="BCODESXP"):
        db["austen_books"]  # a byte-compiled function, not data


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
# XDR parser on hand-built bytes
# ==========================================================================================
def i32(*v: int) -> bytes:
    return struct.pack(f">{len(v)}i", *v)


def header(version: int = 3) -> bytes:
    h = b"X\n" + i32(version, 0x040201, 0x030500)
    return h + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s: str | None, levels: int = 8) -> bytes:
    if s is None:
        return i32(9, -1)
    b = s.encode("utf-8" if levels != 4 else "latin-1")
    return i32(9 | (levels << 12), len(b)) + b


def strsxp(*items, attrs: bytes = b"") -> bytes:
    flags = 16 | (0x200 if attrs else 0)
    return i32(flags, len(items)) + b"".join(charsxp(s) for s in items) + attrs


def sym(name: str) -> bytes:
    return i32(1) + charsxp(name, 64)


def ref(index: int) -> bytes:
    return i32((index << 8) | 255)


def attrlist(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"".join(i32(0x402) + tag + value for tag, value in pairs) + i32(254)


def test_strsxp_v2_and_v3_with_na():
    for version in (2, 3):
        v = unserialize(header(version) + strsxp("a", None, "héllo"))
        assert v == ["a", None, "héllo"] and v.rtype == "character" and v.attributes == {}
    latin = unserialize(header() + i32(16, 1) + charsxp("café", levels=4))
    assert latin == ["café"]


def test_atomic_vectors_and_na():
    na_real = struct.pack(">II", 0x7FF00000, 1954)
    nan = struct.pack(">d", float("nan"))
    assert unserialize(header() + i32(13, 3, 1, -(2**31), 7)) == [1, None, 7]
    assert unserialize(header() + i32(10, 3, 1, 0, -(2**31))) == [True, False, None]
    real = unserialize(header() + i32(14, 3) + struct.pack(">d", 2.5) + na_real + nan)
    assert real[0] == 2.5 and real[1] is None and real[2] != real[2]
    assert unserialize(header() + i32(15, 1) + struct.pack(">dd", 1.0, -2.0)) == [1 - 2j]
    assert unserialize(header() + i32(24, 3) + b"\x00\x01\xff") == [0, 1, 255]
    assert unserialize(header() + i32(254)) is None
    # long-vector length encoding (-1, upper, lower)
    assert unserialize(header() + i32(13, -1, 0, 2, 5, 6)) == [5, 6]


def test_named_list_with_symbol_references():
    # list(a = "x", b = list(c = 1L)): the second `names` symbol is a REFSXP to the first
    # (the inner list is read first, so its `names` creates the symbol)
    inner = i32(19 | 0x200, 1) + i32(13, 1, 1) + attrlist((sym("names"), strsxp("c")))
    outer_names = attrlist((ref(1), strsxp("a", "b")))
    blob = header() + i32(19 | 0x200, 2) + strsxp("x") + inner + outer_names
    v = unserialize(blob)
    assert v.rtype == "list" and v.names == ["a", "b"]
    assert v.as_dict()["a"] == ["x"] and v[1].as_dict() == {"c": [1]}


def test_data_frame_with_altrep_and_factor():
    # data.frame(n = 1:3, f = factor(c("u", "v", "u")), s = c("p", "q", "r"))
    compact = (
        i32(238)
        # info: pairlist(class symbol, package symbol, type 13L)
        + i32(0x2) + sym("compact_intseq") + i32(0x2) + sym("base")
        + i32(0x2) + i32(13, 1, 13) + i32(254)
        # state: c(length, first, increment)
        + i32(14, 3) + struct.pack(">3d", 3, 1, 1)
        + i32(254)
    )
    factor = i32(13 | 0x300, 3, 1, 2, 1) + attrlist(
        (sym("levels"), strsxp("u", "v")), (sym("class"), strsxp("factor"))
    )
    df = (
        header() + i32(19 | 0x300, 3) + compact + factor + strsxp("p", "q", "r")
        + attrlist(
            (sym("names"), strsxp("n", "f", "s")),
            (ref(4), strsxp("data.frame")),  # `class` symbol: 4th reference
            (sym("row.names"), i32(13, 2, -(2**31), -3)),
        )
    )
    v = unserialize(df)
    assert is_data_frame(v) and v.attributes["row.names"] == [None, -3]
    assert as_data_frame(v) == {"n": [1, 2, 3], "f": ["u", "v", "u"], "s": ["p", "q", "r"]}
    assert isinstance(v.attributes, dict) and v.r_class == ["data.frame"]


def test_pairlist_and_symbol():
    blob = (header() + i32(0x402) + sym("k") + strsxp("v")
            + i32(0x402) + ref(1) + i32(254) + i32(254))
    pl = unserialize(blob)
    assert pl.rtype == "pairlist" and pl == [("k", ["v"]), ("k", None)]
    assert unserialize(header() + sym("abc")) == RSymbol("abc")


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"A\n1\n", "ascii"),
        (b"B\n\x00\x00", "native-binary"),
        (b"RDX3\n", "not R XDR"),
        (b"X\n" + i32(4, 0, 0), "format version 4"),
        (header() + i32(16, 5) + charsxp("a"), "truncated"),
        (header() + i32(22), "EXTPTRSXP"),
        (header() + i32(21), "BCODESXP"),
        (header() + i32(99), "unknown type 99"),
        (header() + ref(3), "reference #3 out of range"),
        (header() + i32(13, -7), "negative vector length"),
        (header() + i32(238) + i32(2) + sym("mmap_integer") + i32(254) + i32(254) + i32(254),
         "ALTREP class 'mmap_integer'"),
    ],
)
def test_unserialize_errors(blob, match):
    with pytest.raises(RDataError, match=match):
        unserialize(blob)


def test_decompress_record_methods_and_errors():
    payload = header() + strsxp("z")
    n = i32(len(payload))
    assert decompress_record(n + zlib.compress(payload), 1) == payload
    assert decompress_record(n + b"2" + bz2.compress(payload), 2) == payload
    assert decompress_record(n + b"Z" + lzma.compress(payload), 3) == payload
    assert decompress_record(n + b"0" + payload, 3) == payload
    with pytest.raises(RDataError, match="expected 999 bytes"):
        decompress_record(i32(999) + zlib.compress(payload), 1)
    with pytest.raises(RDataError, match="compression tag"):
        decompress_record(n + b"Q" + payload, 2)
    with pytest.raises(RDataError, match="corrupt"):
        decompress_record(n + b"not zlib at all", 1)
    with pytest.raises(RDataError, match="too short"):
        decompress_record(b"\x00\x01", 1)


def _write_lazyload(
    path: Path, objects: dict[str, bytes], compressed: int, references: dict | None = None
) -> None:
    references = references or {}
    records, offsets, pos = [], [], 0
    for payload in [*objects.values(), *references.values()]:
        body = {1: zlib.compress(payload), 2: b"2" + bz2.compress(payload),
                3: b"Z" + lzma.compress(payload)}[compressed]
        rec = i32(len(payload)) + body
        offsets.append((pos, len(rec)))
        records.append(rec)
        pos += len(rec)
    (path / "Rdata.rdb").write_bytes(b"".join(records))
    var_offsets, ref_offsets = offsets[: len(objects)], offsets[len(objects) :]
    variables = i32(19 | 0x200, len(objects)) + b"".join(i32(13, 2, o, n) for o, n in var_offsets)
    variables += attrlist((sym("names"), strsxp(*objects)))
    refs = i32(19 | (0x200 if references else 0), len(references))
    refs += b"".join(i32(13, 2, o, n) for o, n in ref_offsets)
    refs += attrlist((ref(1), strsxp(*references))) if references else b""
    comp = i32(10, 1, 1) if compressed == 1 else i32(14, 1) + struct.pack(">d", compressed)
    index = header() + i32(19 | 0x200, 3) + variables + refs + comp + attrlist(
        (ref(1), strsxp("variables", "references", "compressed"))
    )
    (path / "Rdata.rdx").write_bytes(gzip.compress(index))


@pytest.mark.parametrize("compressed", [1, 2, 3])
def test_lazyload_db_roundtrip(tmp_path, compressed):
    _write_lazyload(tmp_path, {"a": header() + strsxp("x", "y"), "b": header(2) + i32(13, 1, 42)},
                    compressed)
    db = LazyLoadDB(tmp_path)
    assert db.compressed == compressed and db.names() == ["a", "b"] and len(db) == 2
    assert db["a"] == ["x", "y"] and db["b"] == [42]
    with pytest.raises(KeyError, match="has: a, b"):
        db["nope"]


def test_lazyload_persistent_reference_to_itself(tmp_path):
    persist = i32(247, 0, 1) + charsxp("env::1")  # PERSISTSXP naming the record "env::1"
    env_record = header() + i32(19, 2) + persist + strsxp("payload")  # refers to itself
    _write_lazyload(tmp_path, {"x": header() + i32(19, 1) + persist}, 1, {"env::1": env_record})
    db = LazyLoadDB(tmp_path)
    assert list(db.references) == ["env::1"]
    (env,) = db["x"]
    assert env[1] == ["payload"] and isinstance(env[0], RPersistentRef)
    assert db["x"][0] is env  # each referenced record is read once


def test_lazyload_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Rdata.rdb"):
        LazyLoadDB(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such .rds"):
        read_rds(tmp_path / "x.rds")


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
