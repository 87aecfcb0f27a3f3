"""Real public-domain books that install from the package registries (no web scraping).

* Debian ``r-cran-janeaustenr``: Jane Austen's six novels, one R character vector of lines each
  (``""`` between paragraphs) in ``janeaustenr/data/Rdata.rdb``.
* Debian ``r-cran-tokenizers``: Moby Dick (the Project Gutenberg file, as one string) in
  ``tokenizers/data/Rdata.rdb``.
* PyPI ``sentencepiece`` sdist: ``test/botchan.txt`` (Gutenberg #8868, one line per wrapped line,
  no blank lines).

``fetch_books`` downloads the two ``.deb`` files with ``apt-get download`` (running ``apt-get
update`` only if that fails), unpacks them with ``dpkg-deb -x``, reads the R data with
PyPI's ``rdata`` (:mod:`longrope2.data.r_lazyload`), and downloads the sentencepiece sdist with ``pip
download`` (never building it). Texts are joined into paragraphs (one per line of output,
blank line between; verse and other indented lines keep their breaks), Gutenberg headers and
licence text are removed, and the results are cached as UTF-8 ``.txt`` files plus
``books.json`` under the cache directory, so later ``load_books`` calls need no network.

Cache directory: the ``cache_dir`` argument, else ``$LONGROPE2_BOOKS_DIR``, else
``$XDG_CACHE_HOME/longrope2/books`` (``~/.cache/longrope2/books``).

Your own books (e.g. PG19 ``.txt`` files): :func:`load_text_files`.

Command line: ``python -m longrope2.data.books [--cache-dir DIR] [--refresh] [--json]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from longrope2.data.r_lazyload import LazyLoadDB

__all__ = [
    "Book",
    "BooksError",
    "default_cache_dir",
    "fetch_books",
    "load_books",
    "load_text_files",
    "embedded_book",
    "is_embedded_spec",
    "fetch_debian_packages",
    "download_sentencepiece_sdist",
    "books_from_debian_tree",
    "botchan_from_sdist",
    "join_paragraphs",
    "unwrap_lines",
    "strip_gutenberg",
]

# Bump when the text processing changes, so stale caches are rebuilt.
CACHE_FORMAT = 1
MANIFEST = "books.json"

DEBIAN_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers")
AUSTEN = {  # object name in janeaustenr/data/Rdata.rdb -> title
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
SENTENCEPIECE_FALLBACK_VERSION = "0.2.1"


class BooksError(RuntimeError):
    """Fetching or reading the book corpora failed; the message says what to do."""


@dataclass
class Book:
    title: str
    source: str
    text: str

    @property
    def key(self) -> str:
        """File-name-safe short name (used for the cache file)."""
        return _slug(self.title)

    def __repr__(self) -> str:
        return f"Book(title={self.title!r}, source={self.source!r}, chars={len(self.text)})"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "book"


def default_cache_dir() -> Path:
    env = os.environ.get("LONGROPE2_BOOKS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "longrope2" / "books"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[books] {msg}", file=sys.stderr, flush=True)


# --- text clean-up -------------------------------------------------------------------------
_PG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END_LINE = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.M | re.I)
_PRODUCED_BY = re.compile(r"^(Produced by|E-?text prepared by|Transcribed by)\b", re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to ``*** START OF ...``), the ``Produced by`` credit
    after it, and everything from ``End of Project Gutenberg's ...`` / ``*** END OF ...`` on.
    Text without those markers is returned unchanged (apart from a BOM and CRLFs)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    m = _PG_START.search(text)
    if m:
        text = text[m.end() :].lstrip("\n")
        lines = text.split("\n")
        if lines and _PRODUCED_BY.match(lines[0]):
            # the credit: one line, or a short paragraph ended by a blank line
            end = next((i for i in range(1, 6) if i < len(lines) and not lines[i].strip()), 1)
            text = "\n".join(lines[end:]).lstrip("\n")
    m = _PG_END.search(text)
    if m:
        text = text[: m.start()]
    m = None
    for m in _PG_END_LINE.finditer(text):
        pass
    if m is not None and len(text) - m.start() < 500:  # the closing line, not a mention
        text = text[: m.start()]
    return text.strip("\n") + "\n"


def _join_lines(lines: Sequence[str]) -> str:
    """One paragraph: wrapped prose joined with spaces; indented (verse, letters, tables)
    lines keep their own line and indentation; a trailing hyphen or dash joins without space."""
    out = ""
    prev_indented = False
    for i, line in enumerate(lines):
        indented = line[:1].isspace()
        if i == 0:
            out = line if indented else line.strip()
        elif indented or prev_indented:
            out += "\n" + (line if indented else line.strip())
        elif out.endswith("-"):
            out += line.strip()
        else:
            out += " " + line.strip()
        prev_indented = indented
    return out


def join_paragraphs(lines: Iterable[str]) -> str:
    """Lines with blank lines between paragraphs (R text vectors, Gutenberg files) -> text with
    one paragraph per line and a blank line between paragraphs."""
    paras, cur = [], []
    for raw in lines:
        line = raw.rstrip()
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append(_join_lines(cur))
            cur = []
    if cur:
        paras.append(_join_lines(cur))
    return "\n\n".join(paras) + "\n"


def unwrap_lines(lines: Sequence[str], short_fraction: float = 0.8) -> str:
    """Hard-wrapped lines *without* blank lines between paragraphs (sentencepiece's
    botchan.txt): a line much shorter than the wrap width ends its paragraph."""
    lines = [ln.rstrip() for ln in lines if ln.strip()]
    if not lines:
        return ""
    lengths = sorted(len(ln) for ln in lines)
    width = lengths[int(0.9 * (len(lengths) - 1))]  # typical full line
    limit = short_fraction * width
    out: list[str] = []
    for ln in lines:
        out.append(ln)
        if len(ln) < limit:
            out.append("")
    return join_paragraphs(out)


# --- fetching ------------------------------------------------------------------------------
def _need_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BooksError(
            f"`{name}` not found: {why}. The bundled books come from Debian packages, so this "
            "needs a Debian/Ubuntu system (apt-get from package 'apt', dpkg-deb from 'dpkg'). "
            "Alternatively pass your own plain-text books (e.g. PG19 .txt files) via "
            "longrope2.data.books.load_text_files(paths)."
        )
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_debian_packages(
    packages: Sequence[str], dest: str | os.PathLike, progress: bool = True
) -> Path:
    """``apt-get download`` the packages into ``dest/debs`` and ``dpkg-deb -x`` them into
    ``dest/root``; return ``dest/root``. Runs ``apt-get update`` once if the download fails."""
    apt = _need_tool("apt-get", "needed to download the Debian packages " + ", ".join(packages))
    dpkg = _need_tool("dpkg-deb", "needed to unpack the Debian packages")
    dest = Path(dest)
    debs, root = dest / "debs", dest / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    _say(progress, f"apt-get download {' '.join(packages)}")
    r = _run([apt, "download", *packages], cwd=debs)
    if r.returncode != 0:
        _say(progress, "apt-get download failed; running apt-get update and retrying")
        u = _run([apt, "update"])
        r = _run([apt, "download", *packages], cwd=debs)
        if r.returncode != 0:
            hint = ""
            if u.returncode != 0:
                hint = (
                    f"\n`apt-get update` also failed (exit {u.returncode}): "
                    f"{u.stderr.strip()[-400:]}\n"
                    "Run `sudo apt-get update` first if you are not root."
                )
            raise BooksError(
                f"`apt-get download {' '.join(packages)}` failed (exit {r.returncode}):\n"
                f"{r.stderr.strip()[-800:]}{hint}\nThese packages are in Debian main (e.g. "
                "bookworm) and Ubuntu universe. Or pass your own .txt books via "
                "load_text_files(paths)."
            )
    files = sorted(debs.glob("*.deb"))
    for pkg in packages:
        if not any(f.name.startswith(pkg + "_") for f in files):
            raise BooksError(f"apt-get download reported success but no {pkg}_*.deb in {debs}")
    for f in files:
        x = _run([dpkg, "-x", str(f), str(root)])
        if x.returncode != 0:
            raise BooksError(f"`dpkg-deb -x {f.name}` failed: {x.stderr.strip()[-800:]}")
    return root


def _deb_version(debs_dir: Path, package: str) -> str:
    for f in debs_dir.glob(f"{package}_*.deb"):
        return f.name.split("_")[1].replace("%3a", ":")
    return "?"


def _find_r_data(root: Path, rpkg: str) -> Path:
    hits = sorted(root.glob(f"usr/lib/R/*/{rpkg}/data/Rdata.rdb")) or sorted(
        root.rglob(f"{rpkg}/data/Rdata.rdb")
    )
    if not hits:
        raise BooksError(f"no {rpkg}/data/Rdata.rdb inside the unpacked Debian package ({root})")
    return hits[0]


def books_from_debian_tree(root: str | os.PathLike, versions: dict | None = None) -> list[Book]:
    """The six Austen novels and Moby Dick from an unpacked ``r-cran-janeaustenr`` +
    ``r-cran-tokenizers`` tree (``dpkg-deb -x`` output)."""
    root = Path(root)
    versions = versions or {}
    books = []
    austen_rdb = _find_r_data(root, "janeaustenr")
    db = LazyLoadDB(austen_rdb)
    ver = versions.get("r-cran-janeaustenr", "?")
    for name, title in AUSTEN.items():
        if name not in db:
            raise BooksError(f"{austen_rdb} has no '{name}' (has: {', '.join(db.names())})")
        lines = db[name]
        text = join_paragraphs(x or "" for x in lines)
        books.append(Book(title, f"debian:r-cran-janeaustenr={ver} janeaustenr::{name}", text))
    tok_rdb = _find_r_data(root, "tokenizers")
    md = LazyLoadDB(tok_rdb)["mobydick"]
    raw = "\n".join(x or "" for x in md)
    text = join_paragraphs(strip_gutenberg(raw).split("\n"))
    ver = versions.get("r-cran-tokenizers", "?")
    books.append(Book("Moby Dick", f"debian:r-cran-tokenizers={ver} tokenizers::mobydick", text))
    return books


def _sentencepiece_version() -> str:
    try:
        return importlib.metadata.version("sentencepiece")
    except importlib.metadata.PackageNotFoundError:
        return SENTENCEPIECE_FALLBACK_VERSION


def download_sentencepiece_sdist(
    dest: str | os.PathLike, version: str | None = None, progress: bool = True
) -> Path:
    """``pip download`` the sentencepiece source tarball (no deps, not built); return its path.

    Tries ``--no-build-isolation`` first (about 1 s; pip only reads metadata with the installed
    setuptools), then the default isolated metadata step (tens of seconds)."""
    version = version or _sentencepiece_version()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", str(dest), f"sentencepiece=={version}"]
    _say(progress, f"pip download sentencepiece=={version} (sdist, for test/botchan.txt)")
    r = _run(base[:4] + ["--no-build-isolation"] + base[4:])
    if r.returncode != 0:
        r = _run(base)
    tarballs = sorted(dest.glob("sentencepiece-*.tar.gz"))
    if r.returncode != 0 or not tarballs:
        msg = (r.stderr or r.stdout).strip()[-800:]
        if "No module named pip" in msg:
            msg += "\n(this Python has no pip: `python -m ensurepip` or install pip)"
        raise BooksError(
            f"`pip download sentencepiece=={version}` (sdist) failed (exit {r.returncode}):\n{msg}"
        )
    return tarballs[0]


def botchan_from_sdist(tarball: str | os.PathLike, version: str | None = None) -> Book:
    """Read ``test/botchan.txt`` out of the sentencepiece sdist without unpacking the rest."""
    tarball = Path(tarball)
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith("/botchan.txt")]
        if not members:
            raise BooksError(f"no botchan.txt inside {tarball.name}")
        members.sort(key=lambda m: ("/test/" not in m.name, len(m.name)))
        raw = tf.extractfile(members[0]).read().decode("utf-8-sig")
        inner = members[0].name.split("/", 1)[-1]
    version = version or tarball.name.removeprefix("sentencepiece-").removesuffix(".tar.gz")
    text = unwrap_lines(strip_gutenberg(raw).split("\n"))
    return Book("Botchan", f"pypi:sentencepiece=={version} sdist {inner}", text)


def fetch_books(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[Book]:
    """Download, extract and clean the 8 books; write them to the cache; return them."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longrope2-books-") as tmp:
        tmp = Path(tmp)
        root = fetch_debian_packages(DEBIAN_PACKAGES, tmp / "deb", progress)
        versions = {p: _deb_version(tmp / "deb" / "debs", p) for p in DEBIAN_PACKAGES}
        books = books_from_debian_tree(root, versions)
        sdist = download_sentencepiece_sdist(tmp / "sdist", progress=progress)
        books.append(botchan_from_sdist(sdist))
    _write_cache(cache, books)
    _say(progress, f"{len(books)} books, {sum(len(b.text) for b in books):,} characters, "
                   f"cached in {cache} ({time.perf_counter() - t0:.1f} s)")
    return books


def _write_cache(cache: Path, books: list[Book]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    entries = []
    for b in books:
        fname = f"{b.key}.txt"
        tmp = cache / (fname + ".tmp")
        tmp.write_text(b.text, encoding="utf-8")
        tmp.replace(cache / fname)
        entries.append({"file": fname, "title": b.title, "source": b.source, "chars": len(b.text)})
    manifest = {"format": CACHE_FORMAT, "books": entries}
    tmp = cache / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    tmp.replace(cache / MANIFEST)  # written last: its presence means the cache is complete


def _read_cache(cache: Path) -> list[Book] | None:
    try:
        manifest = json.loads((cache / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != CACHE_FORMAT:
            return None
        books = []
        for e in manifest["books"]:
            text = (cache / e["file"]).read_text(encoding="utf-8")
            if len(text) != e["chars"]:
                return None
            books.append(Book(e["title"], e["source"], text))
        return books
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_books(
    cache_dir: str | os.PathLike | None = None, progress: bool = True, refresh: bool = False
) -> list[Book]:
    """The cached books, fetching them first (network, once) if the cache is absent/stale."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not refresh:
        books = _read_cache(cache)
        if books is not None:
            return books
    return fetch_books(cache, progress=progress)


EMBEDDED = "embedded:"


def embedded_book(name: str, cache_dir: str | os.PathLike | None = None) -> Book:
    """One of the embedded books by title or file slug (``Persuasion``, ``moby_dick``)."""
    books = load_books(cache_dir, progress=False)
    for book in books:
        if name in (book.title, book.key) or _slug(name) == book.key:
            return book
    raise ValueError(f"no embedded book {name!r}; known: {', '.join(b.key for b in books)}")


def is_embedded_spec(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec.startswith(EMBEDDED)


def load_text_files(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    strip_boilerplate: bool = True,
    title_from: Callable[[Path], str] | None = None,
) -> list[Book]:
    """User-supplied plain-text books (e.g. PG19 ``.txt`` files). A directory contributes its
    ``*.txt`` files (sorted). Texts are read as UTF-8 (BOM allowed; Latin-1 fallback) and, with
    ``strip_boilerplate``, Project Gutenberg headers/licences are removed. Title: file stem.
    An entry ``embedded:NAME`` is one of the embedded books (``embedded:persuasion``), so a
    config can hold one out of training and evaluate on it."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if any(is_embedded_spec(p) for p in paths):  # in the given order, files and embedded mixed
        books: list[Book] = []
        for p in paths:
            books += [embedded_book(p[len(EMBEDDED):])] if is_embedded_spec(p) else \
                load_text_files([p], strip_boilerplate, title_from)
        return books
    paths = [Path(p).expanduser() for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError("book file(s) not found: " + ", ".join(missing))
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"no .txt files in directory {p}")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise ValueError("load_text_files: no paths given")
    books = []
    for f in files:
        data = f.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        text = strip_gutenberg(text) if strip_boilerplate else text.replace("\r\n", "\n")
        if not text.strip():
            raise ValueError(f"book file is empty: {f}")
        title = title_from(f) if title_from else f.stem
        books.append(Book(title, f"file:{f.resolve()}", text))
    return books


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longrope2.data.books",
        description="Fetch (once) and list the public-domain books used for needles/training.",
    )
    ap.add_argument("--cache-dir", default=None, help="default: $LONGROPE2_BOOKS_DIR or "
                    "~/.cache/longrope2/books")
    ap.add_argument("--refresh", action="store_true", help="fetch again even if cached")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        t0 = time.perf_counter()
        books = load_books(args.cache_dir, refresh=args.refresh)
        dt = time.perf_counter() - t0
    except BooksError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    rows = [{"title": b.title, "chars": len(b.text), "words": len(b.text.split()),
             "file": str(cache / f"{b.key}.txt"), "source": b.source} for b in books]
    if args.json:
        print(json.dumps({"cache_dir": str(cache), "seconds": round(dt, 2), "books": rows},
                         indent=1))
        return 0
    w = max(len(r["title"]) for r in rows)
    for r in rows:
        print(f"{r['title']:<{w}}  {r['chars']:>9,} chars  {r['words']:>7,} words  {r['source']}")
    print(f"{'total':<{w}}  {sum(r['chars'] for r in rows):>9,} chars  in {cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
