"""Images read and written chunk by chunk: TIFF pages by their tiles or strips, OME-Zarr (NGFF 0.4) images."""

import pickle

import dask.array as da
import numpy as np
import pytest
import tifffile
import tifffile.zarr
import zarr

from alibi_dinov2.io.chunked_images import (
    NGFF_VERSION,
    create_ome_zarr,
    read_tiff_page_lazily,
    read_zarr_image,
)
from alibi_dinov2.io.images import ImageReadError, read_image
from alibi_dinov2.io.tiff_stacks import StackMetadata


@pytest.fixture
def chunk_reads(monkeypatch):
    """The chunk keys tifffile's zarr store hands out (its metadata keys left out)."""
    keys = []
    get = tifffile.zarr.ZarrTiffStore.get

    async def recording_get(self, key, *args, **kwargs):
        if not key.endswith((".json", ".zarray", ".zattrs", ".zgroup")):
            keys.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(tifffile.zarr.ZarrTiffStore, "get", recording_get)
    return keys


def test_a_tiled_page_is_read_by_the_tiles_asked_for(tmp_path, chunk_reads):
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 4096, size=(2, 300, 340), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "tiled.tif", pages, tile=(64, 64))
    lazy = read_tiff_page_lazily(tmp_path / "tiled.tif", page=1)
    assert lazy.shape == (300, 340) and lazy.chunksize == (64, 64) and chunk_reads == []
    np.testing.assert_array_equal(lazy[70:120, 10:60].compute(scheduler="sync"), pages[1, 70:120, 10:60])
    assert len(chunk_reads) == 1  # one 64 x 64 tile of the 5 x 6 the page holds
    np.testing.assert_array_equal(lazy.compute(), read_image(tmp_path / "tiled.tif", page=1))
    assert len(chunk_reads) == 1 + 5 * 6
    # It pickles (for dask.distributed workers) by its path, and reopens the file.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lazy)).compute(), pages[1])


def test_strips_and_separate_colour_planes_read_as_the_whole_page_reader_reads_them(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, size=(3, 100, 120), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate", rowsperstrip=16)
    lazy = read_tiff_page_lazily(tmp_path / "planar.tif")
    assert lazy.shape == (100, 120, 3) and lazy.chunks[0][0] == 16  # strips of 16 rows
    np.testing.assert_array_equal(lazy.compute(), read_image(tmp_path / "planar.tif"))
    (tmp_path / "broken.tif").write_bytes(b"II*\0 not a tiff")
    with pytest.raises(ImageReadError, match="broken.tif: not a readable TIFF"):
        read_tiff_page_lazily(tmp_path / "broken.tif")


@pytest.mark.parametrize("shape, axes", [((300, 340), ["y", "x"]), ((3, 300, 340), ["z", "y", "x"])])
def test_an_ome_zarr_image_is_written_block_by_block_and_read_back_lazily(tmp_path, shape, axes):
    values = np.random.default_rng(2).integers(1, 4, size=shape).astype(np.uint8)
    metadata = StackMetadata(resolution=(4.0, 2.0), unit="um")  # 0.25 um along x, 0.5 um along y
    chunks = (1,) * (len(shape) - 2) + (128, 128)
    level = create_ome_zarr(tmp_path / "mask.ome.zarr", shape, np.uint8, chunks, metadata, {"made_by": "test"})
    da.store(da.from_array(values, chunks=chunks), level, lock=False)
    group = zarr.open_group(str(tmp_path / "mask.ome.zarr"), mode="r")
    assert group.metadata.zarr_format == 2 and group.attrs["made_by"] == "test"
    (multiscale,) = group.attrs["multiscales"]
    assert multiscale["version"] == NGFF_VERSION == "0.4"
    assert [axis["name"] for axis in multiscale["axes"]] == axes
    assert multiscale["axes"][-1] == {"name": "x", "type": "space", "unit": "micrometer"}
    (dataset,) = multiscale["datasets"]
    assert dataset["path"] == "0"
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": [1.0] * (len(shape) - 2) + [0.5, 0.25]}]
    assert (tmp_path / "mask.ome.zarr" / "0" / ".zarray").is_file()  # NGFF 0.4: zarr format 2, "/" chunk keys
    assert (tmp_path / "mask.ome.zarr" / "0" / ("0/" * (len(shape) - 2) + "0") / "0").is_file()
    image, read_metadata = read_zarr_image(tmp_path / "mask.ome.zarr")
    assert isinstance(image, da.Array) and image.chunksize == chunks
    np.testing.assert_array_equal(image.compute(), values)
    assert read_metadata.resolution == (4.0, 2.0) and read_metadata.unit == "um"
