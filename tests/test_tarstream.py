"""The fast tar member reader agrees with Python's tarfile, and fails loudly on damage."""

import gzip
import io
import tarfile

import pytest

from pipeline.data.shards import ShardStats, iter_samples
from pipeline.data.tarstream import TarFormatError, iter_members


def _tar(fmt, members, path):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "a.txt"
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)


MEMBERS = [
    ("a.txt", b"hello", "file"),
    ("dir", b"", "dir"),
    ("dir/" + "x" * 150 + ".json", b'{"long": "name"}', "file"),  # > 100 chars: pax / GNU
    ("caf\u00e9/\u00fcber.png", b"\x89PNG" * 300, "file"),  # unicode name, several blocks
    ("empty.cls", b"", "file"),
    ("ln", b"", "link"),
    ("z" * 90 + "/" + "y" * 90 + ".jpg", b"j" * 1000, "file"),  # ustar prefix field
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_match_tarfile(tmp_path, fmt):
    # plain ustar has no long or non-ASCII names, only the 155-byte prefix field
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or (m[0].isascii() and "x" * 150 not in m[0])]
    path = tmp_path / "t.tar"
    _tar(fmt, members, path)
    with tarfile.open(path) as tar:
        want = [(i.name, i.size, tar.extractfile(i).read()) for i in tar if i.isreg()]
    with open(path, "rb") as f:
        got = [(n, s, d) for n, s, d, _ in iter_members(f)]
    assert got == want
    with open(path, "rb") as f:  # unread members are skipped (seeked over), sizes kept
        partial = [(n, s, d) for n, s, d, _ in iter_members(f, lambda n: n.endswith(".json"))]
    assert [(n, s) for n, s, _ in partial] == [(n, s) for n, s, _ in want]
    assert [d for _, _, d in partial if d is not None] == [d for n, _, d in want if n.endswith(".json")]


def test_non_seekable_stream_reads_through(tmp_path):
    path = tmp_path / "t.tar"
    _tar(tarfile.PAX_FORMAT, MEMBERS, path)

    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self.buf = io.BytesIO(data)

        def readable(self):
            return True

        def read(self, n=-1):
            return self.buf.read(n)

    got = [n for n, _, _, _ in iter_members(Pipe(path.read_bytes()), lambda n: False)]
    assert got == ["a.txt", "dir/" + "x" * 150 + ".json", "caf\u00e9/\u00fcber.png", "empty.cls",
                   "z" * 90 + "/" + "y" * 90 + ".jpg"]


def test_damage_is_an_error(tmp_path):
    path = tmp_path / "t.tar"
    _tar(tarfile.PAX_FORMAT, [("a.txt", b"x" * 2000, "file"), ("b.txt", b"y", "file")], path)
    data = path.read_bytes()
    with pytest.raises(EOFError):
        list(iter_members(io.BytesIO(data[:1000]), lambda n: True))  # inside a.txt's data
    bad = bytearray(path.read_bytes())
    bad[10] ^= 0x01
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(bad))))


def test_gzipped_shard_goes_through_tarfile(tmp_path):
    raw = tmp_path / "t.tar"
    _tar(tarfile.PAX_FORMAT, [("k1.png", b"", "file"), ("k1.cls", b"3", "file"),
                              ("k2.json", b"{}", "file")], raw)
    gz = tmp_path / "t.tar.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    stats = ShardStats()
    assert list(iter_samples(str(gz), stats, decode=False)) == []
    assert stats.read == 2 and stats.skipped == {"empty_image": 1, "missing_image": 1}
    assert not stats.problems
