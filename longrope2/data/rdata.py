"""Pure-Python reader for R's serialized data: ``.rds`` files and lazy-load databases.

R packages keep their ``data/`` objects in a lazy-load database: ``Rdata.rdx`` is an ``.rds``
file (gzip'd serialization) holding ``list(variables = list(name = c(offset, length), ...),
references = ..., compressed = TRUE|2|3)``, and ``Rdata.rdb`` is the concatenation of the
records it points at. A record is a 4-byte big-endian uncompressed length followed by zlib data
(``compressed = TRUE``), or by a one-byte method tag (``'0'`` none, ``'1'`` zlib, ``'2'`` bzip2,
``'Z'`` xz) and the data (``compressed = 2`` or ``3``). Every payload is R's XDR
serialization, format version 2 or 3 (``src/main/serialize.c``).

No R is needed. Values come back as plain Python objects:

* ``NULL`` -> ``None``
* atomic vectors and lists -> :class:`RVector` (a ``list`` subclass with ``rtype`` and
  ``attributes``); ``NA`` becomes ``None`` (``NaN`` that is not ``NA`` stays ``float('nan')``)
* symbols -> :class:`RSymbol`; pairlists and calls -> :class:`RPairlist` of ``(tag, value)``
* environments -> :class:`REnvironment`; ``.GlobalEnv`` and friends -> :class:`RSpecial`

Byte code, external pointers, weak references and unknown ALTREP classes raise
:class:`RDataError` naming the SEXP type, as do the ascii and native-binary formats.

    >>> db = LazyLoadDB("…/janeaustenr/data/Rdata.rdb")
    >>> db.names()            # ['emma', 'mansfieldpark', ...]
    >>> lines = db["emma"]    # RVector of str, one per line of the book
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "RDataError",
    "RVector",
    "RSymbol",
    "RPairlist",
    "REnvironment",
    "RClosure",
    "RSpecial",
    "RPersistentRef",
    "RBuiltin",
    "unserialize",
    "decompress",
    "read_rds",
    "decompress_record",
    "LazyLoadDB",
    "read_rdata",
    "as_data_frame",
    "is_data_frame",
]


class RDataError(ValueError):
    """The bytes are not R serialization this reader understands."""


# --- SEXP type codes (Rinternals.h) and serialize.c pseudo-types -------------------------
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, ANYSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP = 16, 17, 18, 19, 20, 21, 22
WEAKREFSXP, RAWSXP, S4SXP = 23, 24, 25

REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, CLASSREFSXP, GENERICREFSXP, BCREPDEF, EMPTYENV_SXP = 247, 246, 245, 244, 242
BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 241, 240, 239, 238
BCREPREF = 243

SEXP_NAMES = {
    0: "NILSXP", 1: "SYMSXP", 2: "LISTSXP", 3: "CLOSXP", 4: "ENVSXP", 5: "PROMSXP",
    6: "LANGSXP", 7: "SPECIALSXP", 8: "BUILTINSXP", 9: "CHARSXP", 10: "LGLSXP", 13: "INTSXP",
    14: "REALSXP", 15: "CPLXSXP", 16: "STRSXP", 17: "DOTSXP", 18: "ANYSXP", 19: "VECSXP",
    20: "EXPRSXP", 21: "BCODESXP", 22: "EXTPTRSXP", 23: "WEAKREFSXP", 24: "RAWSXP",
    25: "S4SXP", 238: "ALTREP_SXP", 239: "ATTRLISTSXP", 240: "ATTRLANGSXP",
    241: "BASEENV_SXP", 242: "EMPTYENV_SXP", 243: "BCREPREF", 244: "BCREPDEF",
    245: "GENERICREFSXP", 246: "CLASSREFSXP", 247: "PERSISTSXP", 248: "PACKAGESXP",
    249: "NAMESPACESXP", 250: "BASENAMESPACE_SXP", 251: "MISSINGARG_SXP",
    252: "UNBOUNDVALUE_SXP", 253: "GLOBALENV_SXP", 254: "NILVALUE_SXP", 255: "REFSXP",
}

IS_OBJECT_BIT, HAS_ATTR_BIT, HAS_TAG_BIT = 1 << 8, 1 << 9, 1 << 10
# CHARSXP encoding bits in the "levels" field (flags >> 12)
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6
NA_INTEGER = -(2**31)
NA_REAL_LOW_WORD = 1954

_VECTOR_RTYPE = {
    LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", CPLXSXP: "complex",
    STRSXP: "character", VECSXP: "list", EXPRSXP: "expression", RAWSXP: "raw",
}


def _sexp_name(t: int) -> str:
    return SEXP_NAMES.get(t, f"unknown type {t}")


# --- value classes -------------------------------------------------------------------------
class RVector(list):
    """An R vector: list of elements plus ``rtype`` ('character', 'integer', 'list', ...) and
    ``attributes`` (dict of attribute name -> value, e.g. ``names``, ``class``, ``row.names``)."""

    def __init__(self, rtype: str, values: Iterable = (), attributes: dict | None = None):
        super().__init__(values)
        self.rtype = rtype
        self.attributes = attributes if attributes is not None else {}

    @property
    def names(self) -> list | None:
        return self.attributes.get("names")

    @property
    def r_class(self) -> list[str]:
        return list(self.attributes.get("class") or [])

    def as_dict(self) -> dict:
        """Named vector/list -> dict (raises if unnamed)."""
        if self.names is None:
            raise RDataError(f"R {self.rtype} vector has no names attribute")
        return dict(zip(self.names, self))

    def __repr__(self) -> str:
        head = list.__repr__(self[:6]) if len(self) > 6 else list.__repr__(self)
        if len(self) > 6:
            head = head[:-1] + f", ... ({len(self)} total)]"
        attrs = f", attributes={sorted(self.attributes)}" if self.attributes else ""
        return f"RVector({self.rtype!r}, {head}{attrs})"


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass(frozen=True)
class RSpecial:
    """A singleton such as ``.GlobalEnv``, ``emptyenv()``, the unbound value or a missing arg."""

    name: str


@dataclass
class RPersistentRef:
    """A reference written through a persistence hook (lazy-load: usually an environment)."""

    names: list


class RPairlist(list):
    """Pairlist / call: list of ``(tag or None, value)``; ``rtype`` is 'pairlist', 'language'
    or 'dots'."""

    def __init__(self, rtype: str, items: Iterable = (), attributes: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes if attributes is not None else {}

    def as_dict(self) -> dict:
        return {tag: value for tag, value in self}


@dataclass
class REnvironment:
    locked: bool = False
    enclos: Any = None
    bindings: dict = field(default_factory=dict)
    attributes: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # environments can be cyclic
        return f"REnvironment(bindings={sorted(self.bindings)})"


@dataclass
class RClosure:
    formals: Any
    body: Any
    env: Any
    attributes: dict = field(default_factory=dict)


@dataclass
class RBuiltin:
    name: str
    special: bool


# --- the XDR unserializer ------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes | memoryview, persistent_hook=None):
        self.buf = memoryview(data)
        self.pos = 0
        self.refs: list = []
        self.native_encoding = "utf-8"
        self.persistent_hook = persistent_hook

    # primitives
    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise RDataError(
                f"truncated R serialization: need {n} bytes for {what} at offset {self.pos}, "
                f"only {len(self.buf) - self.pos} left"
            )

    def int(self) -> int:
        self._need(4, "an integer")
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if n < 0:
            raise RDataError(f"negative vector length {n} at offset {self.pos - 4}")
        return n

    def bytes(self, n: int) -> bytes:
        self._need(n, f"{n} bytes")
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def ints(self, n: int) -> tuple:
        self._need(4 * n, f"{n} integers")
        v = struct.unpack_from(f">{n}i", self.buf, self.pos)
        self.pos += 4 * n
        return v

    def doubles(self, n: int) -> list:
        self._need(8 * n, f"{n} doubles")
        raw = struct.unpack_from(f">{n}Q", self.buf, self.pos)
        vals = struct.unpack_from(f">{n}d", self.buf, self.pos)
        self.pos += 8 * n
        out = list(vals)
        for i, v in enumerate(vals):
            if v != v and (raw[i] & 0xFFFFFFFF) == NA_REAL_LOW_WORD:
                out[i] = None  # NA_real_ (a NaN whose low word is 1954)
        return out

    # header
    def header(self) -> int:
        self._need(2, "the format marker")
        fmt = bytes(self.buf[:2])
        if fmt == b"A\n":
            raise RDataError("R ascii serialization is not supported (only XDR binary 'X\\n')")
        if fmt == b"B\n":
            raise RDataError("R native-binary serialization is not supported (only XDR 'X\\n')")
        if fmt != b"X\n":
            raise RDataError(
                f"not R XDR serialization: starts with {bytes(self.buf[:8])!r}, expected b'X\\n'"
            )
        self.pos = 2
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader R version
        if version == 3:
            n = self.int()
            enc = self.bytes(n).decode("ascii", "replace")
            self.native_encoding = _python_encoding(enc)
        elif version != 2:
            raise RDataError(f"unsupported R serialization format version {version} (need 2 or 3)")
        return version

    # items
    def charsxp(self, levels: int):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        b = self.bytes(n)
        if levels & (UTF8_MASK | ASCII_MASK):
            return b.decode("utf-8", "replace")
        if levels & LATIN1_MASK:
            return b.decode("latin-1")
        if levels & BYTES_MASK:
            return b
        try:
            return b.decode(self.native_encoding)
        except (UnicodeDecodeError, LookupError):
            return b.decode("latin-1")

    def attributes(self) -> dict:
        pl = self.item()
        if pl is None:
            return {}
        if not isinstance(pl, RPairlist):
            raise RDataError(f"attributes must be a pairlist, got {type(pl).__name__}")
        return {tag: value for tag, value in pl}

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & HAS_ATTR_BIT)
        has_tag = bool(flags & HAS_TAG_BIT)

        if t == NILVALUE_SXP:
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            if not 1 <= idx <= len(self.refs):
                raise RDataError(f"reference #{idx} out of range (table has {len(self.refs)})")
            return self.refs[idx - 1]
        if t == EMPTYENV_SXP:
            return RSpecial("emptyenv")
        if t == BASEENV_SXP:
            return RSpecial("baseenv")
        if t == GLOBALENV_SXP:
            return RSpecial("globalenv")
        if t == UNBOUNDVALUE_SXP:
            return RSpecial("unbound")
        if t == MISSINGARG_SXP:
            return RSpecial("missing_arg")
        if t == BASENAMESPACE_SXP:
            return RSpecial("base_namespace")
        if t == PERSISTSXP:
            names = self.string_vec()
            value = self.persistent_hook(names) if self.persistent_hook else RPersistentRef(names)
            self.refs.append(value)
            return value
        if t in (NAMESPACESXP, PACKAGESXP):
            names = self.string_vec()
            kind = "namespace" if t == NAMESPACESXP else "package"
            value = RSpecial(f"{kind}:{':'.join(str(n) for n in names)}")
            self.refs.append(value)
            return value
        if t == SYMSXP:
            name = self.item()  # a CHARSXP
            sym = RSymbol(name if isinstance(name, str) else str(name))
            self.refs.append(sym)
            return sym
        if t == ENVSXP:
            env = REnvironment(locked=bool(self.int()))
            self.refs.append(env)  # registered before its contents (may be self-referential)
            env.enclos = self.item()
            frame = self.item()
            hashtab = self.item()
            env.attributes = self.attributes()
            for pl in [frame] + (list(hashtab) if isinstance(hashtab, RVector) else []):
                if isinstance(pl, RPairlist):
                    env.bindings.update(pl.as_dict())
            return env
        if t in (LISTSXP, LANGSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP):
            return self.pairlist(flags)
        if t == CLOSXP or t == PROMSXP:
            attrs = self.attributes() if has_attr else {}
            env = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            if t == CLOSXP:
                return RClosure(formals=car, body=cdr, env=env, attributes=attrs)
            return RPairlist("promise", [("env", env), ("value", car), ("expr", cdr)], attrs)
        if t == ALTREP_SXP:
            return self.altrep()
        if t in (SPECIALSXP, BUILTINSXP):
            n = self.int()
            return RBuiltin(self.bytes(n).decode("ascii", "replace"), special=t == SPECIALSXP)
        if t == CHARSXP:
            s = self.charsxp(levels)
            if has_attr:  # written by very old R; read and ignore
                self.item()
            return s
        if t == S4SXP:
            return RVector("S4", [], self.attributes() if has_attr else {})

        if t in _VECTOR_RTYPE:
            n = self.length()
            if t == STRSXP:
                values = self.strings(n)
            elif t == INTSXP:
                values = [None if v == NA_INTEGER else v for v in self.ints(n)]
            elif t == LGLSXP:
                values = [None if v == NA_INTEGER else bool(v) for v in self.ints(n)]
            elif t == REALSXP:
                values = self.doubles(n)
            elif t == CPLXSXP:
                d = self.doubles(2 * n)
                values = [
                    None if d[2 * i] is None or d[2 * i + 1] is None
                    else complex(d[2 * i], d[2 * i + 1])
                    for i in range(n)
                ]
            elif t == RAWSXP:
                values = list(self.bytes(n))
            else:  # VECSXP, EXPRSXP
                values = [self.item() for _ in range(n)]
            return RVector(_VECTOR_RTYPE[t], values, self.attributes() if has_attr else None)

        raise RDataError(
            f"unsupported R object type {_sexp_name(t)} (code {t}, flags {flags:#x}) at offset "
            f"{self.pos - 4}; this reader handles data (vectors, lists, data frames, "
            "pairlists, environments), not byte code, external pointers or weak references"
        )

    def strings(self, n: int) -> list:
        out = [None] * n
        buf, unpack = self.buf, struct.unpack_from
        for i in range(n):
            self._need(8, "a string element")
            flags, length = unpack(">ii", buf, self.pos)
            if flags & 0xFF != CHARSXP or flags & HAS_ATTR_BIT:
                out[i] = self.item()  # unusual element: take the general path
                continue
            self.pos += 8
            if length == -1:
                continue
            self._need(length, "string bytes")
            b = bytes(buf[self.pos : self.pos + length])
            self.pos += length
            levels = flags >> 12
            if levels & (UTF8_MASK | ASCII_MASK):
                out[i] = b.decode("utf-8", "replace")
            else:
                self.pos -= 8 + length
                out[i] = self.item()
        return out

    def string_vec(self) -> list:
        if self.int() != 0:
            raise RDataError("names of a namespace/package/persistent reference must start with 0")
        n = self.int()
        return [self.item() for _ in range(n)]

    def pairlist(self, flags: int) -> RPairlist:
        t = flags & 0xFF
        rtype = {LISTSXP: "pairlist", ATTRLISTSXP: "pairlist", DOTSXP: "dots"}.get(t, "language")
        items: list = []
        first_attrs: dict = {}
        while True:  # iterate along the CDR chain instead of recursing
            attrs = self.attributes() if flags & HAS_ATTR_BIT else {}
            if not items:
                first_attrs = attrs
            tag = self.item() if flags & HAS_TAG_BIT else None
            if isinstance(tag, RSymbol):
                tag = tag.name
            items.append((tag, self.item()))
            flags = self.int()
            t = flags & 0xFF
            if t not in (LISTSXP, LANGSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP):
                self.pos -= 4
                tail = self.item()
                if tail is not None:  # a dotted pair: keep the tail
                    items.append((None, tail))
                return RPairlist(rtype, items, first_attrs)

    def altrep(self):
        info = self.item()
        state = self.item()
        attr = self.item()
        attrs = {t: v for t, v in attr} if isinstance(attr, RPairlist) else {}
        first = info[0][1] if isinstance(info, RPairlist) and info else None
        cls = first.name if isinstance(first, RSymbol) else repr(info)
        if cls in ("compact_intseq", "compact_realseq"):
            n, n1, inc = state[0], state[1], state[2]
            n = int(n)
            if cls == "compact_intseq":
                vals = [int(n1) + int(inc) * i for i in range(n)]
                return RVector("integer", vals, attrs)
            return RVector("double", [float(n1) + float(inc) * i for i in range(n)], attrs)
        if cls.startswith("wrap_"):
            x = state[0]
            if isinstance(x, RVector):
                x = RVector(x.rtype, x, {**x.attributes, **attrs})
            return x
        if cls == "deferred_string":
            arg = state[0][1] if isinstance(state, RPairlist) else state[0]
            vals = [None if v is None else _r_number_string(v) for v in arg]
            return RVector("character", vals, attrs)
        raise RDataError(f"unsupported ALTREP class {cls!r} (supported: compact_intseq, "
                         "compact_realseq, wrap_*, deferred_string)")


def _r_number_string(v) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    return format(v, ".15g")


def _python_encoding(r_encoding: str) -> str:
    e = r_encoding.strip().lower()
    if e in ("", "native.enc"):
        return "utf-8"
    if e.startswith("latin1") or e == "iso-8859-1":
        return "latin-1"
    return e


def unserialize(data: bytes | memoryview, persistent_hook=None) -> Any:
    """Decode one uncompressed R serialization (what ``serialize(x, NULL)`` writes)."""
    r = _Reader(data, persistent_hook)
    r.header()
    value = r.item()
    return value


# --- compressed containers -----------------------------------------------------------------
def decompress(blob: bytes) -> bytes:
    """Undo the compression of an ``.rds`` file (gzip, bzip2, xz, zlib, or none)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:3] == b"BZh":
        return bz2.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        import lzma

        return lzma.decompress(blob)
    if blob[:2] in (b"X\n", b"A\n", b"B\n"):
        return blob
    if len(blob) > 5 and blob[4] == 0x78:  # 4-byte length + zlib stream (lazy-load record)
        return decompress_record(blob, 1)
    raise RDataError(f"unknown compression: file starts with {blob[:8]!r}")


def read_rds(path: str | os.PathLike) -> Any:
    """Read an ``.rds`` file (``saveRDS`` output)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such .rds file: {p}")
    return unserialize(decompress(p.read_bytes()))


def decompress_record(blob: bytes, compressed: int | bool = 1) -> bytes:
    """Decompress one lazy-load record (``compressed`` is the ``.rdx`` field: 1/TRUE, 2 or 3)."""
    if len(blob) < 5:
        raise RDataError(f"lazy-load record too short ({len(blob)} bytes)")
    (outlen,) = struct.unpack_from(">I", blob, 0)
    compressed = int(compressed)
    if compressed == 0:
        return blob
    if compressed == 1:
        method, payload = b"1", blob[4:]
    elif compressed in (2, 3):
        method, payload = blob[4:5], blob[5:]
    else:
        raise RDataError(f"unknown lazy-load compression {compressed} (expected TRUE, 2 or 3)")
    try:
        if method == b"1":
            out = zlib.decompress(payload)
        elif method == b"2":
            out = bz2.decompress(payload)
        elif method == b"Z":
            import lzma

            out = lzma.decompress(payload)
        elif method == b"0":
            out = payload
        else:
            raise RDataError(f"unknown lazy-load record compression tag {method!r}")
    except (zlib.error, OSError, ValueError) as e:
        if isinstance(e, RDataError):
            raise
        raise RDataError(f"corrupt lazy-load record: {e}") from e
    if len(out) != outlen:
        raise RDataError(f"lazy-load record: expected {outlen} bytes, decompressed {len(out)}")
    return out


class LazyLoadDB:
    """An R lazy-load database (``Rdata.rdb`` + ``Rdata.rdx``, or ``pkg.rdb`` + ``pkg.rdx``).

    ``rdb`` may be the ``.rdb`` path, its stem, or a package's ``data/`` folder."""

    def __init__(self, rdb: str | os.PathLike, rdx: str | os.PathLike | None = None):
        rdb = Path(rdb)
        if rdb.is_dir():
            rdb = rdb / "Rdata.rdb"
        if rdb.suffix != ".rdb":
            rdb = rdb.with_suffix(".rdb")
        rdx = Path(rdx) if rdx is not None else rdb.with_suffix(".rdx")
        for p in (rdb, rdx):
            if not p.is_file():
                raise FileNotFoundError(f"lazy-load database file not found: {p}")
        self.rdb_path, self.rdx_path = rdb, rdx
        index = read_rds(rdx)
        if not isinstance(index, RVector) or index.names is None or "variables" not in index.names:
            raise RDataError(f"{rdx} is not a lazy-load index (no 'variables' element)")
        d = index.as_dict()
        comp = d.get("compressed")
        comp = comp[0] if comp is not None and len(comp) else True
        # logical TRUE/FALSE (zlib / none) or numeric 2 (bzip2/zlib) / 3 (xz/bzip2/zlib)
        self.compressed = int(comp) if comp is not None else 1
        self.variables = self._offsets(d["variables"])
        self.references = self._offsets(d.get("references"))
        self._data = None
        self._refs: dict = {}

    @staticmethod
    def _offsets(lst) -> dict[str, tuple[int, int]]:
        if lst is None or len(lst) == 0:
            return {}
        return {name: (int(v[0]), int(v[1])) for name, v in zip(lst.names, lst)}

    def names(self) -> list[str]:
        return list(self.variables)

    def __contains__(self, name: str) -> bool:
        return name in self.variables

    def __len__(self) -> int:
        return len(self.variables)

    def raw(self, offset: int, length: int) -> bytes:
        if self._data is None:
            self._data = self.rdb_path.read_bytes()
        if offset < 0 or offset + length > len(self._data):
            raise RDataError(
                f"record ({offset}, {length}) lies outside {self.rdb_path} "
                f"({len(self._data)} bytes)"
            )
        return decompress_record(self._data[offset : offset + length], self.compressed)

    def _hook(self, names):
        """Resolve a persistent reference (``"env::N"``): lazy-load stores each environment
        as its own record, ``list(bindings, enclos, attributes, isS4, locked)``; that list is
        returned. Each record is read once, so self-references cannot recurse forever (a
        reference met while its own record is being read stays an :class:`RPersistentRef`)."""
        key = names[0] if names else None
        if key not in self.references:
            return RPersistentRef(names)
        if key not in self._refs:
            self._refs[key] = RPersistentRef(names)  # placeholder while reading
            self._refs[key] = unserialize(self.raw(*self.references[key]), self._hook)
        return self._refs[key]

    def __getitem__(self, name: str) -> Any:
        if name not in self.variables:
            raise KeyError(f"{name!r} not in {self.rdb_path} (has: {', '.join(self.variables)})")
        return unserialize(self.raw(*self.variables[name]), self._hook)

    def items(self):
        for name in self.variables:
            yield name, self[name]


def read_rdata(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, Any]:
    """All (or the named) objects of a lazy-load database, as ``{name: value}``."""
    db = LazyLoadDB(path)
    return {n: db[n] for n in (names if names is not None else db.names())}


# --- data frames ---------------------------------------------------------------------------
def is_data_frame(obj) -> bool:
    return isinstance(obj, RVector) and obj.rtype == "list" and "data.frame" in obj.r_class


def as_data_frame(obj) -> dict[str, list]:
    """An R data frame (or any named list of equal-length vectors) -> ``{column: values}``.

    Factor columns are decoded to their level strings."""
    if not isinstance(obj, RVector) or obj.rtype != "list":
        raise RDataError(f"not an R list/data frame: {type(obj).__name__}")
    if obj.names is None:
        raise RDataError("R list has no names; cannot make columns")
    cols = {}
    for name, col in zip(obj.names, obj):
        if isinstance(col, RVector) and "factor" in col.r_class:
            levels = col.attributes.get("levels") or []
            col = [None if code is None else levels[code - 1] for code in col]
        cols[name] = list(col) if col is not None else []
    lengths = {len(c) for c in cols.values()}
    if len(lengths) > 1:
        raise RDataError(f"columns have different lengths: {sorted(lengths)}")
    return cols
