"""Where each sample's image bytes lie in its tar: a small Parquet file per shard (key, offset,
size, label), so one image is fetched with one ranged read, never by scanning its shard.

Written by the shards stage beside the shard table (``shards/offsets/NNNNN.parquet``; the table
itself stays O(shards) because the driver loads it whole). Compressed tars cannot be
range-read: their file records no offsets, and a lookup says so."""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("key", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                    ("label", pa.int64())])


class ImageNotFound(LookupError):
    """An image that cannot be served; the message says why (unknown key, compressed tar, ...)."""


def write_offsets(path: str | os.PathLike, url: str, rows: list[dict]) -> dict:
    """The shard's offsets file, written whole under a temp name and renamed into place."""
    compressed = any(r["offset"] is None for r in rows)
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata(
        {"url": url, "compressed": str(compressed).lower()})
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return {"offsets": len(rows), "compressed": compressed}


@dataclass(frozen=True)
class ShardOffsets:
    url: str
    compressed: bool
    where: dict  # key -> (offset, size)
    labels: dict  # key -> label (or None)

    def locate(self, key: str) -> tuple[int, int]:
        if key not in self.where:
            raise ImageNotFound(f"key {key!r} is not in shard {self.url}")
        if self.compressed:
            raise ImageNotFound(f"{self.url} is a compressed tar: its members cannot be "
                                "range-read; re-shard it uncompressed to fetch images by id")
        return self.where[key]


def read_offsets(path: str | os.PathLike) -> ShardOffsets:
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    cols = table.to_pydict()
    where = {k: (o, s) for k, o, s in zip(cols["key"], cols["offset"], cols["size"], strict=True)}
    return ShardOffsets(meta.get("url", str(path)), meta.get("compressed") == "true", where,
                        dict(zip(cols["key"], cols["label"], strict=True)))


def scan_offsets(url: str) -> ShardOffsets:
    """A shard's offsets read from the tar itself (headers only, image bytes seeked over): for
    shards outside a job folder, e.g. the query split that ``serve`` lists."""
    from pipeline.data.shards import scan_shard

    rows: list[dict] = []
    scan_shard(url, rows)
    where = {r["key"]: (r["offset"], r["size"]) for r in rows}
    compressed = any(r["offset"] is None for r in rows)
    return ShardOffsets(url, compressed, where, {r["key"]: r["label"] for r in rows})


def read_range(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a local file or fsspec URL: one ranged read."""
    fs, path = fsspec.core.url_to_fs(url)
    data = fs.cat_file(path, start=offset, end=offset + size)
    if len(data) != size:
        raise ImageNotFound(f"{url}: {size} bytes wanted at offset {offset}, got {len(data)} "
                            "(the shard changed since it was scanned?)")
    return data
