import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.fashion_mnist import import_fashion_mnist, load_split, missing_files, read_idx
from pipeline.data.shards import ShardStats, expand_shards, iter_samples, scan_shard

REAL_FM = "/usr/share/datasets/fashion-mnist"


def _png(value: int = 128, size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_import_writes_img2dataset_layout(fm_source, tmp_path):
    folders = import_fashion_mnist(str(fm_source), str(tmp_path / "fm"), samples_per_shard=100)
    train = sorted(p.name for p in folders["train"].glob("*.tar"))
    assert train == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]  # 360 images
    assert json.loads((folders["train"] / "00000_stats.json").read_text())["count"] == 100
    with tarfile.open(folders["train"] / "00003.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["00003000000.cls", "00003000000.json", "00003000000.png"]
    assert len(names) == 60 * 3
    stats = ShardStats()
    samples = list(iter_samples(str(folders["test"] / "00000.tar"), stats, channels=1))
    images, labels = load_split(fm_source, "test")
    assert [s.label for s in samples] == labels[:100].tolist()
    assert np.array_equal(samples[7].image[..., 0], images[7])  # PNG is lossless
    assert samples[0].meta["split"] == "test" and samples[0].meta["source_index"] == 0
    # same settings -> the import is skipped (marker), different -> redone
    mtime = (folders["train"] / "00000.tar").stat().st_mtime_ns
    import_fashion_mnist(str(fm_source), str(tmp_path / "fm"), samples_per_shard=100)
    assert (folders["train"] / "00000.tar").stat().st_mtime_ns == mtime


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    bad = tmp_path / "x-idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "y-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 5)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    assert missing_files(tmp_path)  # none of the four files is there


@pytest.mark.skipif(not missing_files(REAL_FM) == [], reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_package_reads():
    images, labels = load_split(REAL_FM, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    assert np.bincount(labels).tolist() == [6000] * 10


def test_bad_samples_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "00000.tar"
    _write_tar(shard, [
        ("a.png", _png(10)), ("a.cls", b"1"),
        ("b.png", b"\x89PNG\r\n\x1a\nthis is not a png"), ("b.cls", b"2"),  # corrupt
        ("c.json", b"{}"), ("c.cls", b"3"),  # no image
        ("d.png", b""), ("d.cls", b"4"),  # empty
        ("e.png", _png(20, (200, 200))), ("e.cls", b"5"),  # over the pixel limit below
        ("f.png", _png(30)), ("f.cls", b"x"),  # bad label
        ("g.png", _png(40)), ("g.json", b"{not json"), ("g.cls", b"6"),  # bad json: kept
    ])
    stats = ShardStats()
    samples = list(iter_samples(str(shard), stats, channels=1, max_pixels=10_000))
    assert [s.key for s in samples] == ["a", "g"]
    assert stats.read == 7 and stats.decoded == 2
    assert stats.skipped == {"corrupt_image": 1, "empty_image": 1, "missing_image": 1,
                             "oversized_image": 1, "bad_label": 1}
    assert stats.problems == {"bad_json": 1}
    assert stats.read == len(samples) + sum(stats.skipped.values())
    # the decode-free scan sees the same keys
    scan = scan_shard(str(shard))  # no decoding: corrupt bytes and sizes are not seen
    assert scan.read == 7 and scan.skipped == {"missing_image": 1, "bad_label": 1, "empty_image": 1}
    # keys outside a subset are passed over, unread and uncounted
    only = ShardStats(record_keys=True)
    assert [s.key for s in iter_samples(str(shard), only, channels=1, keys={"b", "g"})] == ["g"]
    assert only.read == 2 and only.skipped_keys == [("b", "corrupt_image")]


def test_truncated_tar_yields_samples_before_the_damage(tmp_path):
    whole = tmp_path / "whole.tar"
    _write_tar(whole, [(f"{k:03d}.png", _png(k)) for k in range(20)])
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    stats = ShardStats()
    samples = list(iter_samples(str(cut), stats, channels=1))
    assert 5 <= len(samples) < 20
    assert [s.key for s in samples] == [f"{k:03d}" for k in range(len(samples))]
    assert stats.problems.get("truncated_tar", 0) + sum(stats.skipped.values()) >= 1


def test_expand_shards_forms(tmp_path):
    for i in range(3):
        _write_tar(tmp_path / f"{i:05d}.tar", [("a.png", _png())])
    want = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path)) == want
    assert expand_shards(str(tmp_path / "*.tar")) == want
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == want
    assert expand_shards([want[0], "file://" + want[1]]) == want[:2]
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_shards(str(tmp_path / "nope"))


def test_import_images_packs_a_labelled_folder_into_shards(tmp_path):
    """`knn-defense import-images`: file bytes kept as they are, labels from the names, a clear
    one-line error (and nothing written) when a name does not match the pattern."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.data.shards import load_images

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, label in enumerate([3, 7, 1]):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(src / f"img_{i}_{label}.png")
    (src / "notes.txt").write_text("not an image")
    runner = CliRunner()
    out = tmp_path / "shards"
    result = runner.invoke(main, ["import-images", str(src), "--out-dir", str(out),
                                  "--label-pattern", r"_(\d+)\.png$", "--samples-per-shard", "2"])
    assert result.exit_code == 0, result.output
    assert "3 images -> 2 shard(s)" in result.output
    keys, images, labels, skipped = load_images(sorted(str(p) for p in out.glob("*.tar")), 3)
    assert list(labels) == [3, 7, 1] and images.shape == (3, 10, 12, 3) and not skipped
    bad = runner.invoke(main, ["import-images", str(src), "--out-dir", str(tmp_path / "bad"),
                               "--label-pattern", r"class(\d+)"])
    assert bad.exit_code == 2 and "img_0_3.png: file name does not match" in bad.output
    assert not (tmp_path / "bad").exists()
