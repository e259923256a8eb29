"""Images by id: each shard's offsets file, one ranged read per image, and the job-folder and
DefendedClassifier lookups over it."""

import gzip
import io
import tarfile

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from pipeline.data.fashion_mnist import write_split_shards
from pipeline.data.offsets import (
    ImageNotFound,
    read_offsets,
    read_range,
    scan_offsets,
    write_offsets,
)
from pipeline.data.shards import scan_shard
from tests.conftest import synthetic_images


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under ``counting://``, counting every byte read from any file."""

    protocol = "counting"
    bytes_read = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        read = f.read

        def counted(*args):
            data = read(*args)
            CountingFileSystem.bytes_read += len(data)
            return data

        f.read = counted
        return f


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    images, labels = synthetic_images(60, seed=4)
    path = write_split_shards(images, labels, tmp_path_factory.mktemp("shards"), "train",
                              samples_per_shard=60)[0]
    return path, images, labels


def _members(path) -> dict:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_offsets_locate_every_image_exactly(shard, tmp_path):
    path, images, labels = shard
    rows = []
    stats = scan_shard(str(path), rows)
    assert stats.read == len(rows) == 60
    members = _members(path)
    for row in rows:
        assert read_range(str(path), row["offset"], row["size"]) == members[f"{row['key']}.png"]
    write_offsets(tmp_path / "00000.parquet", str(path), rows)
    table = read_offsets(tmp_path / "00000.parquet")
    assert table.url == str(path) and not table.compressed
    key = rows[7]["key"]
    pixels = np.asarray(Image.open(io.BytesIO(read_range(str(path), *table.locate(key)))))
    assert np.array_equal(pixels, images[7]) and table.labels[key] == labels[7]
    with pytest.raises(ImageNotFound, match="'no-such-key' is not in shard"):
        table.locate("no-such-key")


def test_one_image_is_one_ranged_read_of_its_bytes(shard):
    path, _, _ = shard
    offsets = scan_offsets(str(path))
    key = sorted(offsets.where)[30]
    offset, size = offsets.locate(key)
    CountingFileSystem.bytes_read = 0
    data = read_range(f"counting://{path}", offset, size)
    assert data == _members(path)[f"{key}.png"]
    assert CountingFileSystem.bytes_read == size < path.stat().st_size // 30


def test_compressed_tar_records_no_offsets_and_says_why(shard, tmp_path):
    path, _, _ = shard
    gz = tmp_path / "00000.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    offsets = scan_offsets(str(gz))
    assert offsets.compressed and len(offsets.where) == 60
    with pytest.raises(ImageNotFound, match="compressed tar: its members cannot be range-read"):
        offsets.locate(next(iter(offsets.where)))


def test_neighbour_images_by_id_from_a_finished_job(finished_job):
    from pipeline.defense.classifier import DefendedClassifier

    spec, layout, _, (images, _) = finished_job
    assert sorted(p.name for p in layout.offsets_dir.iterdir()) == \
        [f"{i:05d}.parquet" for i in range(pq.read_table(layout.shards_table).num_rows)]
    defense = DefendedClassifier.from_job(layout.root)
    try:
        _, _, neigh = defense.predict(images[:5, ..., None], return_neighbours=True)
        for q in range(5):  # a database image's nearest neighbour is itself: same pixels back
            data = defense.image(neigh.ids[q, 0])
            if neigh.distances[q, 0] < 1e-3:
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), images[q])
        with pytest.raises(ImageNotFound, match="no shard 4000"):
            defense.image(4000 << 24)
        with pytest.raises(ImageNotFound, match="has no row 9999"):
            defense.image(9999)
    finally:
        defense.close()


def test_older_job_folders_get_offsets_from_a_rescan(finished_job):
    """A job folder written before offsets existed: re-running the job scans only the shards
    that lack an offsets file, and runs nothing else."""
    from pipeline.runtime.job import run_job
    from pipeline.runtime.manifest import Manifest

    spec, layout, _, _ = finished_job
    victim = layout.offsets_file(2)
    before = pq.read_table(victim)
    victim.unlink()
    run_job(spec)
    assert pq.read_table(victim).equals(before)
    units = list(Manifest(layout.manifest).units("shards.offsets"))
    assert [(u["unit"], u["state"]) for u in units] == [("00002", "done")]
