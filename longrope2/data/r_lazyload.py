"""An R package's lazy-load database (``data/Rdata.rdb`` + ``Rdata.rdx``), read with PyPI's
``rdata`` (no R needed).

``Rdata.rdx`` is a gzip'd serialization of ``list(variables = list(name = c(offset, length)),
references = ..., compressed = TRUE | 2 | 3)``; ``Rdata.rdb`` concatenates the records it points
at. A record is a 4-byte big-endian uncompressed length, then zlib data (``compressed = TRUE``),
or a one-byte method tag (``'0'`` none, ``'1'`` zlib, ``'2'`` bzip2, ``'Z'`` xz) and the data
(``compressed = 2`` or ``3``); R's ``lazyLoadDBfetch`` in ``src/main/serialize.c``. That framing
is all this module does: ``rdata.parser.parse_data`` + ``rdata.conversion.convert`` read each
payload (R's XDR serialization).

    >>> db = LazyLoadDB(".../janeaustenr/data")
    >>> db.names()            # ['emma', 'mansfieldpark', ...]
    >>> lines = db["emma"]    # numpy array of str, one per line of the book
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

_METHODS = {b"0": lambda data: data, b"1": zlib.decompress, b"2": bz2.decompress, b"Z": lzma.decompress}


def unserialize(payload: bytes) -> Any:
    """An R object from its XDR serialization, as ``rdata`` converts it (character vectors and
    numbers to numpy arrays, named lists to dicts)."""
    from rdata.conversion import convert
    from rdata.parser import parse_data

    with warnings.catch_warnings():  # a bare serialization, no file header: rdata says it assumes RDS
        warnings.filterwarnings("ignore", message="Unknown file type")
        return convert(parse_data(payload))


def decompress_record(record: bytes, compressed: int) -> bytes:
    """One ``.rdb`` record's serialization (see the module docstring for the framing)."""
    if len(record) < 5:
        raise ValueError(f"lazy-load record too short ({len(record)} bytes)")
    (length,) = struct.unpack(">i", record[:4])
    body = record[4:]
    if compressed == 1:
        method = zlib.decompress
    else:
        method = _METHODS.get(body[:1])
        if method is None:
            raise ValueError(f"lazy-load record: unknown compression tag {body[:1]!r}")
        body = body[1:]
    try:
        payload = method(body)
    except (zlib.error, OSError, lzma.LZMAError, ValueError) as error:
        raise ValueError(f"lazy-load record: corrupt compressed data ({error})") from None
    if len(payload) != length:
        raise ValueError(f"lazy-load record: expected {length} bytes, got {len(payload)}")
    return payload


class LazyLoadDB:
    """``name -> R object`` of one lazy-load database: a folder holding ``Rdata.rdb``, the
    ``.rdb`` file itself, or its path without the suffix (``R/janeaustenr``)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "Rdata"
        base = path.with_suffix("") if path.suffix in (".rdb", ".rdx") else path
        self.rdb, self.rdx = base.with_name(base.name + ".rdb"), base.with_name(base.name + ".rdx")
        for file in (self.rdb, self.rdx):
            if not file.is_file():
                raise FileNotFoundError(f"no lazy-load database file {file}")
        index = unserialize(gzip.decompress(self.rdx.read_bytes()))
        self.variables = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
        self.compressed = int(index["compressed"][0])

    def names(self) -> list[str]:
        return list(self.variables)

    def __contains__(self, name: object) -> bool:
        return name in self.variables

    def __len__(self) -> int:
        return len(self.variables)

    def __getitem__(self, name: str) -> Any:
        if name not in self.variables:
            raise KeyError(f"{self.rdb} has no {name!r} (has: {', '.join(self.variables)})")
        offset, length = self.variables[name]
        with open(self.rdb, "rb") as f:
            f.seek(offset)
            record = f.read(length)
        return unserialize(decompress_record(record, self.compressed))
