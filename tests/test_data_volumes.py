"""Volume readers and chunked outputs: exact windows, lazy reads, errors that name the problem."""

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from stt_model.data import create_output, open_volume, split_spec
from stt_model.data.volumes import HDF5Volume, N5Volume, SliceFolderVolume, TiffVolume, VolumeReadError, ZarrVolume

LUCCHI = Path("/work/shared/data/lucchi_pp_train.h5")
WINDOWS = [
    (slice(2, 7), slice(5, 21), slice(3, 40)),
    (3, slice(None), slice(10, 12)),
    (slice(None), 4, 7),
    (Ellipsis, slice(1, 30, 3)),
    (slice(1, 9, 2), slice(-10, None), Ellipsis),
    (-1,),
]


@pytest.fixture(scope="module")
def array() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (9, 33, 45), dtype=np.uint8)


def write_h5(path: Path, datasets: dict) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data, chunks=(2, 8, 8))
    return path


def write_folder(path: Path, array: np.ndarray, suffix: str = ".png") -> Path:
    path.mkdir()
    for z, plane in enumerate(array):  # unpadded numbers: natural order differs from lexical order
        if suffix == ".png":
            Image.fromarray(plane).save(path / f"slice{z}.png")
        else:
            tifffile.imwrite(path / f"slice{z}.tif", plane)
    return path


def make(kind: str, tmp_path: Path, array: np.ndarray) -> str:
    if kind == "h5":
        return f"{write_h5(tmp_path / 'v.h5', {'image': array, 'label': array // 2})}:image"
    if kind == "tiff":
        tifffile.imwrite(tmp_path / "v.tif", array)
        return str(tmp_path / "v.tif")
    if kind == "tiff-compressed":
        tifffile.imwrite(tmp_path / "v.tif", array, compression="zlib")
        return str(tmp_path / "v.tif")
    if kind == "png-folder":
        return str(write_folder(tmp_path / "slices", array))
    if kind == "tif-folder":
        return str(write_folder(tmp_path / "slices", array, ".tif"))
    import zarr

    zarr.create_array(str(tmp_path / "v.zarr"), data=array, chunks=(2, 8, 8))
    return str(tmp_path / "v.zarr")


@pytest.mark.parametrize("kind", ["h5", "tiff", "tiff-compressed", "png-folder", "tif-folder", "zarr"])
def test_windows_round_trip(kind, tmp_path, array):
    volume = open_volume(make(kind, tmp_path, array))
    assert tuple(volume.shape) == array.shape and volume.dtype == np.uint8
    for key in WINDOWS:
        np.testing.assert_array_equal(volume[key], array[key], err_msg=f"{kind} {key}")
    again = pickle.loads(pickle.dumps(volume))  # DataLoader workers get pickled copies
    np.testing.assert_array_equal(again[1:3], array[1:3])


def test_slice_folder_reads_only_touched_slices(tmp_path, array, monkeypatch):
    volume = open_volume(write_folder(tmp_path / "slices", array))
    assert [p.name for p in volume.files][:3] == ["slice0.png", "slice1.png", "slice2.png"]
    read = []
    import stt_model.data.volumes as volumes

    original = volumes._read_slice
    monkeypatch.setattr(volumes, "_read_slice", lambda p: read.append(p.name) or original(p))
    volume[4:6, :5, :5]
    assert read == ["slice4.png", "slice5.png"]


def test_compressed_tiff_reads_page_by_page(tmp_path, array, monkeypatch):
    tifffile.imwrite(tmp_path / "v.tif", array, compression="zlib")
    volume = open_volume(tmp_path / "v.tif")
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: pytest.fail("read the whole stack"))
    np.testing.assert_array_equal(volume[3:5, 2:4], array[3:5, 2:4])


def test_hdf5_window_bigger_than_memory_budget(tmp_path):
    """A 2 GiB dataset (chunked, never written, so tiny on disk) is windowed without loading it."""
    import resource

    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("main", shape=(512, 2048, 2048), dtype=np.uint8, chunks=(16, 128, 128), fillvalue=7)
    volume = open_volume(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    window = volume[100:116, 1000:1128, 5:133]
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert window.shape == (16, 128, 128) and (window == 7).all()
    assert grown_kib < 200 * 1024


def test_dataset_defaults(tmp_path, array):
    only = open_volume(write_h5(tmp_path / "one.h5", {"anything": array}))
    assert isinstance(only, HDF5Volume) and only.dataset == "anything"
    several = open_volume(write_h5(tmp_path / "two.hdf5", {"label": array, "image": array}))
    assert several.dataset == "image"
    nested = open_volume(f"{write_h5(tmp_path / 'g.h5', {'volumes/raw': array, 'x': array})}:volumes/raw")
    assert nested.dataset == "volumes/raw"


def test_zarr_groups(tmp_path, array):
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("volumes/raw", data=array, chunks=(2, 8, 8))
    group.create_array("volumes/labels", data=array // 3, chunks=(2, 8, 8))
    np.testing.assert_array_equal(open_volume(f"{tmp_path / 'g.zarr'}:volumes/labels")[2:4], array[2:4] // 3)
    with pytest.raises(ValueError, match=r"no dataset 'raw'; available: volumes/labels, volumes/raw"):
        open_volume(f"{tmp_path / 'g.zarr'}:raw")


def test_errors_name_the_problem(tmp_path, array):
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        open_volume(tmp_path / "missing.h5")
    path = write_h5(tmp_path / "v.h5", {"image": array, "label": array})
    with pytest.raises(ValueError, match=r"no dataset 'raw'; available: image, label"):
        open_volume(f"{path}:raw")
    ambiguous = write_h5(tmp_path / "w.h5", {"a": array, "b": array})
    with pytest.raises(ValueError, match=r"several datasets.*available: a, b"):
        open_volume(ambiguous)
    (tmp_path / "v.nii").write_bytes(b"")
    with pytest.raises(ValueError, match=r"v.nii: unsupported volume format .nii"):
        open_volume(tmp_path / "v.nii")
    folder = write_folder(tmp_path / "mixed", array[:3])
    Image.fromarray(array[0, :10]).save(folder / "slice3.png")
    shapes = r"slices differ in shape \(slice0.png is \(33, 45\), slice3.png is \(10, 45\)\)"
    with pytest.raises(ValueError, match=shapes):
        open_volume(folder)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((10, 12, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match=r"rgb.tif: expected a grayscale stack"):
        open_volume(tmp_path / "rgb.tif")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"junk.h5 is not a readable HDF5 file"):
        open_volume(tmp_path / "junk.h5")
    (tmp_path / "junk.tif").write_bytes(b"not tiff")
    with pytest.raises(ValueError, match=r"junk.tif: not a TIFF file"):
        open_volume(tmp_path / "junk.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no"):
        open_volume(tmp_path / "empty")


def test_split_spec():
    assert split_spec("a/b.h5:image") == (Path("a/b.h5"), "image")
    assert split_spec("a/b.H5") == (Path("a/b.H5"), None)
    assert split_spec("c.zarr:labels/x") == (Path("c.zarr"), "labels/x")
    assert split_spec("d.tif") == (Path("d.tif"), None)


def test_reader_types(tmp_path, array):
    assert isinstance(open_volume(make("tiff", tmp_path, array)), TiffVolume)
    assert isinstance(open_volume(make("png-folder", tmp_path, array)), SliceFolderVolume)
    assert isinstance(open_volume(make("zarr", tmp_path, array)), ZarrVolume)
    assert open_volume(array) is array


@pytest.mark.parametrize("name", ["out.h5:probs", "out.zarr"])
def test_output_written_by_windows_and_published_on_close(tmp_path, name):
    data = np.random.default_rng(1).integers(0, 255, (2, 10, 40, 50), dtype=np.uint8)
    spec = str(tmp_path / name)
    final = split_spec(spec)[0]
    with create_output(spec, data.shape, np.uint8, chunks=(1, 4, 16, 16)) as out:
        for z in range(0, 10, 4):
            out[:, z : z + 4] = data[:, z : z + 4]
        assert not final.exists(), "the final name appears only when the output is complete"
    assert final.exists() and not list(tmp_path.glob(".*tmp*"))
    back = open_volume(spec)
    assert tuple(back.shape) == data.shape
    np.testing.assert_array_equal(back[(slice(None),) * 4], data)


@pytest.mark.parametrize("name", ["out.h5", "out.zarr"])
def test_output_removed_on_failure(tmp_path, name):
    with pytest.raises(RuntimeError):
        with create_output(tmp_path / name, (4, 8, 8), np.float32) as out:
            out[:2] = 1.0
            raise RuntimeError("inference crashed")
    assert list(tmp_path.iterdir()) == []


def test_failed_output_leaves_the_previous_one(tmp_path):
    (tmp_path / "out.h5").write_text("previous run")
    out = create_output(tmp_path / "out.h5", (4, 8, 8), np.uint8)
    out[:] = 3
    out.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]
    assert (tmp_path / "out.h5").read_text() == "previous run"


def test_output_errors(tmp_path):
    with pytest.raises(ValueError, match=r"out.tif: outputs are written as HDF5"):
        create_output(tmp_path / "out.tif", (2, 2, 2))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_output(tmp_path / "nowhere" / "out.h5", (2, 2, 2))


@pytest.mark.skipif(not LUCCHI.exists(), reason="the Lucchi++ volume is not on this machine")
def test_lucchi_opens_through_open_volume():
    volume = open_volume(f"{LUCCHI}:image")
    assert tuple(volume.shape) == (165, 768, 1024) and volume.dtype == np.uint8
    with h5py.File(LUCCHI, "r") as f:
        expected = f["image"][40:56, 300:428, 500:628]
        labels = open_volume(f"{LUCCHI}:label")
        np.testing.assert_array_equal(labels[40:56, 300:428, 500:628], f["label"][40:56, 300:428, 500:628])
    np.testing.assert_array_equal(volume[40:56, 300:428, 500:628], expected)


def _ome_zarr(path: Path, levels: list, zarr_format: int = 2, axes: str = "zyx", labels: dict = None) -> Path:
    """An OME-Zarr multiscale image: OME-Zarr 0.4 (zarr v2, metadata at the top of .zattrs) or 0.5
    (zarr v3, under "ome"), arrays "0", "1", ... full resolution first; ``labels`` adds label images."""
    import zarr

    def image(group, arrays):
        for i, level in enumerate(arrays):
            group.create_array(str(i), data=level, chunks=(1,) * (level.ndim - 3) + (2, 8, 8))
        meta = {
            "version": "0.4" if zarr_format == 2 else "0.5",
            "name": "em",
            "axes": [{"name": a, "type": {"t": "time", "c": "channel"}.get(a, "space")} for a in axes],
            "datasets": [
                {
                    "path": str(i),
                    "coordinateTransformations": [{"type": "scale", "scale": [1.0] * (len(axes) - 2) + [2.0**i] * 2}],
                }
                for i in range(len(arrays))
            ],
        }
        group.attrs.update(
            {"multiscales": [meta]} if zarr_format == 2 else {"ome": {"version": "0.5", "multiscales": [meta]}}
        )

    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    image(root, levels)
    for name, arrays in (labels or {}).items():
        image(root.require_group(f"labels/{name}"), arrays)
    return path


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_opens_level_0_and_any_level_by_name(tmp_path, array, zarr_format):
    levels = [array, array[:, ::2, ::2], array[:, ::4, ::4]]
    mask = (array > 128).astype(np.uint8)
    path = _ome_zarr(tmp_path / "em.ome.zarr", levels, zarr_format, labels={"mito": [mask, mask[:, ::2, ::2]]})
    bare = open_volume(path)
    assert isinstance(bare, ZarrVolume) and bare.dataset == "0" and tuple(bare.shape) == array.shape
    np.testing.assert_array_equal(bare[2:5, 3:20], array[2:5, 3:20])
    for level, expected in enumerate(levels):
        by_name, by_path = open_volume(f"{path}:{level}"), open_volume(path / str(level))
        assert tuple(by_name.shape) == tuple(by_path.shape) == expected.shape
        np.testing.assert_array_equal(by_name[:], expected)
        np.testing.assert_array_equal(by_path[1:3], expected[1:3])
    labels = open_volume(f"{path}:labels/mito")  # a label image: its level 0
    assert labels.dataset == "labels/mito/0"
    np.testing.assert_array_equal(labels[:], mask)
    np.testing.assert_array_equal(open_volume(path / "labels" / "mito")[:], mask)
    np.testing.assert_array_equal(open_volume(f"{path}:labels/mito/1")[:], mask[:, ::2, ::2])
    with pytest.raises(ValueError, match=r"no dataset '5' \(multiscale levels: 0, 1, 2\); available: 0, 1, 2, labels"):
        open_volume(f"{path}:5")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_time_and_channel_axes_of_size_1_are_hidden(tmp_path, array, zarr_format):
    five = array[None, None]  # (t, c, z, y, x), as bioformats2raw writes
    path = _ome_zarr(tmp_path / "tczyx.ome.zarr", [five, five[..., ::2, ::2]], zarr_format, axes="tczyx")
    for spec in (path, f"{path}:1", path / "1"):
        volume = open_volume(spec)
        assert len(volume.shape) == 3, spec
    volume = open_volume(path)
    assert tuple(volume.shape) == array.shape
    for key in WINDOWS:
        np.testing.assert_array_equal(volume[key], array[key], err_msg=str(key))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(volume))[3], array[3])
    # Two channels are data, not a size-1 axis to hide: the level keeps all its axes.
    two = np.stack([array, array])
    kept = open_volume(_ome_zarr(tmp_path / "czyx.ome.zarr", [two], zarr_format, axes="czyx"))
    assert tuple(kept.shape) == two.shape


def test_a_plain_zarr_array_keeps_leading_axes_of_size_1(tmp_path, array):
    """Without OME axes metadata nothing says an axis is a channel: (1, Z, Y, X) probabilities stay 4-d."""
    import zarr

    zarr.create_array(str(tmp_path / "p.zarr"), data=array[None], chunks=(1, 2, 8, 8))
    assert tuple(open_volume(tmp_path / "p.zarr").shape) == (1, *array.shape)


def test_ome_zarr_metadata_naming_a_missing_level_says_so(tmp_path, array):
    import zarr

    path = _ome_zarr(tmp_path / "em.ome.zarr", [array])
    group = zarr.open_group(str(path), mode="a")
    meta = dict(group.attrs)["multiscales"]
    meta[0]["datasets"][0]["path"] = "s0"
    group.attrs["multiscales"] = meta
    with pytest.raises(ValueError, match=r"multiscales metadata names level 0 's0', which is not an array there"):
        open_volume(path)


# Written by zarr 2.18's N5Store (the reference N5 writer of the zarr world; zarr 3 has none):
# (3, 7, 9) volumes in (2, 4, 5) blocks, edge blocks padded, each compression N5 knows but lz4.
N5 = Path(__file__).parent / "data" / "ref.n5"
N5_DATASETS = {
    "raw": "u2",
    "gzip": "u2",
    "zlib": "u1",
    "blosc": "u2",
    "bzip2": "i4",
    "xz": "f4",
    "zstd": "u8",
    "volumes/labels": "u1",
}
N5_WINDOWS = [
    (slice(0, 2), slice(1, 6), slice(3, 9)),
    (1, slice(None), slice(4, 6)),
    (slice(None), 4, 7),
    (Ellipsis, slice(1, 9, 3)),
    (slice(None, None, -1), slice(5, 0, -2), slice(None)),
    (2, 6, 8),
    (-1,),
    (slice(1, 1),),
    (slice(None), slice(4, 7), slice(5, 9)),
]


def n5_expected(dtype: str) -> np.ndarray:
    """What the fixture's writer stored (a deterministic pattern, floats divided by 7)."""
    pattern = (np.arange(3 * 7 * 9, dtype=np.uint64).reshape(3, 7, 9) * 2654435761) % 60000
    return pattern.astype(np.float32) / np.float32(7.0) if dtype == "f4" else pattern.astype(dtype)


@pytest.mark.parametrize("name", sorted(N5_DATASETS))
def test_n5_datasets_written_by_zarr_2_read_exactly(name):
    expected = n5_expected(N5_DATASETS[name])
    volume = open_volume(f"{N5}:{name}")
    assert isinstance(volume, N5Volume) and volume.dataset == name
    assert tuple(volume.shape) == expected.shape and volume.dtype == expected.dtype
    assert volume.dtype.isnative and volume.chunks == (2, 4, 5)
    for key in N5_WINDOWS:
        np.testing.assert_array_equal(volume[key], expected[key], err_msg=f"{name} {key}")
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(volume))[1:3], expected[1:3])


def test_n5_specs_blocks_never_written_and_cropped_edge_blocks(tmp_path):
    sparse = open_volume(N5 / "sparse")  # the dataset's folder, named directly
    assert sparse.dataset is None and sparse.source == str(N5 / "sparse")
    expected = np.zeros((3, 7, 9), np.float32)
    expected[0:2, 0:4, 0:5] = 1.5  # the one block written
    np.testing.assert_array_equal(sparse[:], expected)
    assert open_volume(N5).dataset == "raw"  # the conventional name, as in HDF5 and zarr
    with pytest.raises(ValueError, match=r"ref.n5 has no dataset 'labels'; available: .*volumes/labels"):
        open_volume(f"{N5}:labels")
    # Java's N5 stores an edge block cropped to the volume, its header giving its own size.
    import shutil
    import struct
    import zlib

    copy = shutil.copytree(N5, tmp_path / "vol.n5")
    edge = open_volume(f"{copy}:gzip")._stored().read_block((1, 1, 1))
    cropped = edge[:1, :3, :4]  # z 2:3, y 4:7, x 5:9 of the volume
    block = struct.pack(">HH3I", 0, 3, 4, 3, 1) + zlib.compress(cropped.astype(">u2").tobytes(), wbits=31)
    (copy / "gzip" / "1" / "1" / "1").write_bytes(block)
    np.testing.assert_array_equal(open_volume(f"{copy}:gzip")[:], n5_expected("u2"))


def test_n5_damage_and_unsupported_features_name_the_problem(tmp_path):
    import json
    import shutil

    copy = shutil.copytree(N5, tmp_path / "vol.n5")
    (copy / "gzip" / "0" / "1" / "0").write_bytes(b"\x00\x00\x00\x03" + b"\x00" * 12 + b"not gzip")
    volume = open_volume(f"{copy}:gzip")
    np.testing.assert_array_equal(volume[:, :4], n5_expected("u2")[:, :4])  # the damaged block is not read
    with pytest.raises(VolumeReadError, match=r"vol.n5:gzip: cannot read chunk z 0:2, y 4:8, x 0:5 .*damaged"):
        volume[:, 2:6]
    attributes = json.loads((copy / "raw" / "attributes.json").read_text())
    for change, message in (
        ({"compression": {"type": "lz4"}}, r"N5 compression 'lz4' is not supported"),
        ({"dataType": "object"}, r"N5 dataType 'object' is not supported"),
    ):
        (copy / "raw" / "attributes.json").write_text(json.dumps({**attributes, **change}))
        with pytest.raises(ValueError, match=message):
            open_volume(f"{copy}:raw")
    (tmp_path / "flat.n5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"flat.n5 is not an N5 container: N5 is a folder"):
        open_volume(tmp_path / "flat.n5")


def test_an_n5_container_without_the_suffix_is_recognised(tmp_path):
    import shutil

    copy = shutil.copytree(N5, tmp_path / "container")
    np.testing.assert_array_equal(open_volume(f"{copy / 'zlib'}")[:], n5_expected("u1"))


def test_readers_share_the_base_class_and_repr(tmp_path, array):
    from stt_model.data.volumes import _Reader

    for kind, name in (
        ("h5", "HDF5Volume"),
        ("tiff", "TiffVolume"),
        ("png-folder", "SliceFolderVolume"),
        ("zarr", "ZarrVolume"),
    ):
        spec = make(kind, tmp_path / kind, array) if (tmp_path / kind).mkdir() is None else None
        volume = open_volume(spec)
        assert isinstance(volume, _Reader)
        assert repr(volume) == f"{name}('{volume.source}', shape={array.shape}, dtype=uint8)"
    assert open_volume(make("h5", tmp_path / "h5", array)).source.endswith("v.h5:image")
