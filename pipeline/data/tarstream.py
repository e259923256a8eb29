"""A fast reader of uncompressed tar members for web-scale scans.

Python's ``tarfile`` parses every header in Python objects and, in stream mode, reads through
the bytes of members nobody wants (the images, in a metadata scan). This reader parses the
512-byte ustar headers directly (with pax ``x``/``g`` records and GNU long names), returns only
the members asked for, and seeks over the others when the stream can seek. Compressed tars go
through ``tarfile`` instead (see ``pipeline.data.shards``).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\0", b"7")


class TarFormatError(tarfile.TarError):
    pass


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for big numbers
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad {what} field {field!r}") from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def iter_members(stream, wanted: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, int, bytes | None, int]]:
    """Regular members as (name, size, data or None, end offset of the member's padded data).
    Raises EOFError on a truncated header or member, TarFormatError on a corrupt header; ends
    quietly at the end-of-archive block (the caller checks the file size)."""
    seekable = getattr(stream, "seekable", lambda: False)()
    offset = 0
    pax_global: dict[bytes, bytes] = {}
    pax_next: dict[bytes, bytes] = {}
    long_name: bytes | None = None

    def read_exact(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise EOFError(f"unexpected end of data at byte {offset + len(data)}")
        return data

    while True:
        header = stream.read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise EOFError(f"truncated header at byte {offset}")
        stored = _octal(header[148:156], "checksum")
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarFormatError(f"bad header checksum at byte {offset}")
        offset += BLOCK
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"x", b"g", b"L", b"K"):  # metadata for the next member(s)
            data = read_exact(padded)[:size]
            offset += padded
            if kind == b"x":
                pax_next = _pax_records(data)
            elif kind == b"g":
                pax_global.update(_pax_records(data))
            elif kind == b"L":
                long_name = data.rstrip(b"\0")
            continue
        pax = {**pax_global, **pax_next}
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pax.get(b"path", long_name or name)
        if b"size" in pax:
            size = int(pax[b"size"])
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        pax_next, long_name = {}, None
        text = name.decode("utf-8", "surrogateescape")
        data = None
        if kind in REGULAR and (wanted is None or wanted(text)):
            data = read_exact(padded)[:size]
        elif seekable:
            stream.seek(padded, 1)
        else:
            read_exact(padded)
        offset += padded
        if kind in REGULAR:
            yield text, size, data, offset
