"""Inputs are checked, not guessed: one intensity rule for training and prediction,
carried in the checkpoint; NaN/Inf images, bad labels and NaN weights refused with their
location before any work; damaged files reported in one line naming the file and the
slice or chunk."""

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from stt_model.build import build_model
from stt_model.checkpoint import atomic_save, checkpoint_config, load_checkpoint
from stt_model.cli import main
from stt_model.config import ConfigError, load_config
from stt_model.data import (
    InputError,
    PatchSampler,
    VolumeReadError,
    ZRange,
    check_image,
    check_labels,
    open_volume,
    synthetic_volume,
    to_unit_range,
)
from stt_model.infer import InferOptions, predict
from stt_model.segment import probabilities

TINY = {
    "base": "tiny-cpu",
    "model": {"channels": [4, 8], "heads": [1, 2], "sst_levels": [False, True], "norm": "batch"},
    "data": {"patch": [4, 32, 32], "augment": False},
    "loss": {"discriminator_channels": 4},
}
PATCH = (4, 16, 16)


class Echo(nn.Module):
    """Logits whose sigmoid is the input, so a prediction shows what the model was fed."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        p = x.clamp(1e-4, 1 - 1e-4)
        return torch.log(p / (1 - p))


def echo(volume, intensity="dtype", block=None):
    out = np.zeros((1, *volume.shape), np.float32)
    predict(Echo(), volume, out, InferOptions((4, 8, 8), progress=False, intensity=intensity, block=block))
    return out[0]


@pytest.fixture(scope="module")
def content():
    return synthetic_volume((8, 32, 32), seed=5)


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data, chunks=(2, 16, 16), compression="gzip")
    return path


def tiny_checkpoint(path, config=TINY, poison=None):
    config = load_config(config)
    torch.manual_seed(0)
    model = build_model(config)
    state = model.state_dict()
    if poison is not None:
        state[poison] = state[poison].clone()
        state[poison].view(-1)[3] = float("nan")
    atomic_save({"config": config.to_dict(), "model": state}, path)
    return path


def one_line_error(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stt {command}: error:") and "\n" not in err, err
    return err


# -- one normalisation ----------------------------------------------------------------------------


def test_uint16_predicts_what_the_same_content_in_uint8_does(content):
    """Before: prediction divided only uint8, so a uint16 image reached the model as 0..65535."""
    image8 = content.image
    image16 = image8.astype(np.uint16) * 257  # the same intensities, 16-bit
    np.testing.assert_allclose(echo(image16), image8 / 255.0, atol=1e-4)
    config = load_config(TINY)
    torch.manual_seed(0)
    model = build_model(config).eval()
    p8 = probabilities(model, config, image8, progress=False).astype(int)
    p16 = probabilities(model, config, image16, progress=False).astype(int)
    assert np.abs(p8 - p16).max() <= 1 and 0 < p8.mean() < 255
    # Training sees exactly what prediction sees.
    labels = content.labels
    b8 = next(iter(PatchSampler((image8, labels), PATCH, seed=1)))
    b16 = next(iter(PatchSampler((image16, labels), PATCH, seed=1)))
    torch.testing.assert_close(b16["image"], b8["image"], atol=1e-6, rtol=0)


def test_float_image_outside_unit_range_is_refused_with_the_fix(content, tmp_path):
    """Before: a float32 0..255 image was clipped to 1.0 everywhere in training."""
    image = content.image.astype(np.float32)
    path = write_h5(tmp_path / "f.h5", image=image)
    with pytest.raises(
        InputError,
        match=r"f\.h5:image: float intensities span \[\d+, \d+\], outside \[0, 1\].*"
        r"data\.intensity: \[\d+, \d+\]",
    ):
        PatchSampler((f"{path}:image", content.labels), PATCH)
    model = Echo()
    with pytest.raises(InputError, match=r"data\.intensity: \["):
        predict(
            model,
            open_volume(f"{path}:image"),
            np.zeros((1, *image.shape), np.float32),
            InferOptions((4, 8, 8), progress=False),
        )
    assert model.calls == 0, "refused before the first window"
    with pytest.raises(InputError, match="outside"):
        to_unit_range(np.array([0.0, 1.5], np.float32))
    # Floats already in [0, 1] pass as they are.
    unit = (content.image / 255.0).astype(np.float32)
    np.testing.assert_array_equal(to_unit_range(unit), unit)


def test_stated_range_maps_linearly_and_clips_only_outside_it(content):
    np.testing.assert_allclose(
        to_unit_range(np.array([-10, 0, 127.5, 255, 300], np.float32), [0, 255]), [0, 0, 0.5, 1, 1]
    )
    np.testing.assert_allclose(to_unit_range(np.array([100, 150, 200], np.uint16), [100, 200]), [0, 0.5, 1])
    float255 = content.image.astype(np.float32)
    labels = content.labels
    stated = next(iter(PatchSampler((float255, labels), PATCH, seed=2, intensity=[0, 255])))
    dtype8 = next(iter(PatchSampler((content.image, labels), PATCH, seed=2)))
    torch.testing.assert_close(stated["image"], dtype8["image"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(echo(float255, [0, 255]), echo(content.image), atol=1e-5)
    # Prediction takes the rule from the config it is given (the checkpoint's).
    config = load_config({**TINY, "data": {**TINY["data"], "intensity": [0, 255]}})
    torch.manual_seed(0)
    model = build_model(config).eval()
    from_float = probabilities(model, config, float255, progress=False)
    from_uint8 = probabilities(model, load_config(TINY), content.image, progress=False)
    assert np.abs(from_float.astype(int) - from_uint8.astype(int)).max() <= 1


def test_negative_signed_integers_need_a_stated_range():
    image = np.zeros((4, 16, 16), np.int16)
    image[1, 2, 3] = -7
    with pytest.raises(InputError, match=r"intensity -7 at z=1, y=2, x=3 is negative.*data\.intensity: \[-32768"):
        check_image(image)
    check_image(image, [-10, 10])
    assert to_unit_range(image, [-10, 10])[1, 2, 3] == pytest.approx(0.15)


def test_intensity_travels_in_the_checkpoint(tmp_path):
    config = {**TINY, "data": {**TINY["data"], "intensity": [10, 1000]}}
    state = load_checkpoint(tiny_checkpoint(tmp_path / "a.pt", config))
    assert checkpoint_config(state).data.intensity == [10.0, 1000.0]
    # A checkpoint from before the field loads with the rule it was trained with.
    old = load_checkpoint(tiny_checkpoint(tmp_path / "b.pt"))
    del old["config"]["data"]["intensity"]
    assert checkpoint_config(old).data.intensity == "dtype"


@pytest.mark.parametrize(
    "value, message",
    [
        ("minmax", "data.intensity must be 'dtype' or a list of numbers; got 'minmax'"),
        ([5], r"data.intensity must be 'dtype' or \[min, max\]"),
        ([255, 0], "min < max"),
        ([0, "a"], r"data.intensity\[1\] must be a number"),
        ([0, float("nan")], r"data.intensity\[1\] must be a finite number"),
    ],
)
def test_bad_intensity_configs_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**TINY, "data": {**TINY["data"], "intensity": value}})


# -- NaN/Inf in images ----------------------------------------------------------------------------


def test_nan_is_refused_with_the_first_location_in_zyx_order(tmp_path):
    image = np.full((8, 32, 32), 0.5, np.float32)
    image[5, 1, 1] = np.nan  # met first in block order (block (0, 0, 0))...
    image[3, 20, 20] = np.inf  # ...but this one comes first in (z, y, x) order
    image[7, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"\+Inf at z=3, y=20, x=20 \(the first non-finite voxel\)"):
        check_image(image, block=(8, 16, 16))
    path = write_h5(tmp_path / "nan.h5", image=image)
    with pytest.raises(InputError, match=rf"{path}:image: \+Inf at z=3, y=20, x=20"):
        PatchSampler((f"{path}:image", np.zeros(image.shape, np.uint8)), PATCH)
    # A slice range of a file reports the file's own z.
    with pytest.raises(InputError, match=r"NaN at z=5, y=1, x=1"):
        check_image(ZRange(open_volume(f"{path}:image"), 4, 8))
    # A stated range does not excuse NaN.
    with pytest.raises(InputError, match="NaN at z=5, y=1, x=1"):
        check_image(ZRange(open_volume(f"{path}:image"), 4, 8), [0, 1])


def test_nan_image_is_refused_before_prediction_runs():
    image = np.full((6, 20, 20), 0.25, np.float32)
    image[4, 7, 9] = np.nan
    model = Echo()
    with pytest.raises(InputError, match=r"the image: NaN at z=4, y=7, x=9"):
        predict(model, image, np.zeros((1, *image.shape), np.float32), InferOptions((4, 8, 8), progress=False))
    assert model.calls == 0


def test_scan_reads_stay_within_the_prediction_block():
    class Counting:
        def __init__(self, data):
            self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

        def __getitem__(self, key):
            self.reads.append(self.data[key].size)
            return self.data[key]

    volume = Counting(np.random.default_rng(0).random((8, 64, 64), dtype=np.float32))
    echo(volume, block=(4, 16, 16))
    assert len(volume.reads) > 16 and max(volume.reads) <= (4 + 8) * (16 + 16) * (16 + 16) < volume.data.size
    # Unsigned images cannot hold a bad value under 'dtype': nothing is read to check them.
    unread = Counting(np.zeros((4, 8, 8), np.uint16))
    check_image(unread)
    assert unread.reads == []


def test_non_finite_probabilities_are_refused_naming_the_block():
    class Broken(nn.Module):
        def forward(self, x):
            return x * float("nan")

    with pytest.raises(ValueError, match=r"NaN/Inf probabilities in block z 0:4, y 0:16, x 0:16"):
        predict(
            Broken(),
            np.zeros((4, 16, 16), np.uint8),
            np.zeros((1, 4, 16, 16), np.uint8),
            InferOptions((4, 8, 8), progress=False, block=(4, 16, 16)),
        )


def test_cli_refuses_nan_images_in_one_line(tmp_path, content, capsys):
    image = (content.image / 255.0).astype(np.float32)
    image[2, 3, 4] = np.nan
    path = write_h5(tmp_path / "v.h5", image=image, label=content.labels)
    checkpoint = tiny_checkpoint(tmp_path / "m.pt")
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--image", f"{path}:image", "--out", str(tmp_path / "p.h5")])
        == 2
    )
    assert f"{path}:image: NaN at z=2, y=3, x=4" in one_line_error(capsys, "predict")
    assert not (tmp_path / "p.h5").exists()
    assert (
        main(
            [
                "train",
                "--config",
                str(write_yaml(tmp_path)),
                "--image",
                f"{path}:image",
                "--label",
                f"{path}:label",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert f"{path}:image: NaN at z=2, y=3, x=4" in one_line_error(capsys, "train")
    assert not (tmp_path / "run" / "last.pt").exists()


def write_yaml(tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": {"iterations": 1, "batch_size": 1, "warmup": 1}}))
    return path


# -- labels ---------------------------------------------------------------------------------------


def test_negative_labels_are_refused_naming_value_and_voxel(tmp_path, content):
    """Before: -1 (an 'ignore' marker in many datasets) was trained as foreground."""
    labels = content.labels.astype(np.int16)
    labels[6, 30, 2] = -1
    path = write_h5(tmp_path / "lab.h5", label=labels)
    with pytest.raises(
        InputError,
        match=rf"{path}:label: label -1 at z=6, y=30, x=2 is negative.*"
        r"There is no ignore label",
    ):
        PatchSampler((content.image, f"{path}:label"), PATCH)
    assert (
        main(
            [
                "train",
                "--config",
                str(write_yaml(tmp_path)),
                "--image",
                str(write_tiff(tmp_path, content)),
                "--label",
                f"{path}:label",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )


def test_negative_labels_in_the_validation_slices_are_refused_too(tmp_path, content, capsys):
    labels = content.labels.astype(np.int16)
    z = labels.shape[0] - 1
    labels[z, 5, 7] = -1
    path = write_h5(tmp_path / "lab.h5", label=labels)
    assert (
        main(
            [
                "train",
                "--config",
                str(write_yaml(tmp_path)),
                "--image",
                str(write_tiff(tmp_path, content)),
                "--label",
                f"{path}:label",
                "--val-z",
                f"{z}:{z + 1}",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert f"label -1 at z={z}, y=5, x=7 is negative" in one_line_error(capsys, "train")


def write_tiff(tmp_path, content):
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, content.image)
    return path


def test_fractional_float_labels_are_refused_and_whole_ones_accepted():
    labels = np.zeros((4, 16, 16), np.float32)
    labels[1:3, 4:8, 4:8] = 2.0
    check_labels(labels)
    labels[2, 9, 1] = 0.5
    with pytest.raises(InputError, match=r"label 0.5 at z=2, y=9, x=1 is not a non-negative whole number"):
        check_labels(labels)
    labels[2, 9, 1] = np.nan
    with pytest.raises(InputError, match=r"label nan at z=2, y=9, x=1"):
        PatchSampler((np.zeros(labels.shape, np.uint8), labels), PATCH)


# -- NaN weights ----------------------------------------------------------------------------------


def test_nan_weights_are_refused_at_load_naming_the_parameter(tmp_path, content, capsys):
    """Before: a NaN checkpoint predicted all-zero probabilities and exited 0."""
    name = next(k for k, v in build_model(load_config(TINY)).state_dict().items() if v.is_floating_point())
    checkpoint = tiny_checkpoint(tmp_path / "nan.pt", poison=name)
    with pytest.raises(ValueError, match=rf"model parameter {name} holds 1 NaN/Inf value"):
        load_checkpoint(checkpoint)
    path = write_h5(tmp_path / "v.h5", image=content.image)
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--image", f"{path}:image", "--out", str(tmp_path / "p.h5")])
        == 2
    )
    assert f"model parameter {name} holds 1 NaN/Inf" in one_line_error(capsys, "predict")


@pytest.mark.parametrize("entry", ["training_model", "discriminator"])
def test_nan_weights_beside_the_model_are_refused_at_load(tmp_path, entry):
    """The trained weights kept beside a weight average, and the discriminator, are what a resumed
    run continues from."""
    checkpoint = tiny_checkpoint(tmp_path / "ok.pt")
    state = torch.load(checkpoint, weights_only=True)
    name, value = next((k, v) for k, v in state["model"].items() if v.is_floating_point())
    poisoned = value.clone()
    poisoned.view(-1)[0] = float("nan")
    state[entry] = {**state["model"], name: poisoned}
    torch.save(state, tmp_path / "nan.pt")
    label = entry.replace("_", " ")
    with pytest.raises(ValueError, match=rf"{label} parameter {name} holds 1 NaN/Inf value"):
        load_checkpoint(tmp_path / "nan.pt")


# -- damaged data ---------------------------------------------------------------------------------


def test_damaged_gzip_chunk_names_the_file_and_chunk(tmp_path, content, capsys):
    path = write_h5(tmp_path / "d.h5", image=content.image)
    with h5py.File(path, "r") as f:
        ds = f["image"]
        info = next(
            ds.id.get_chunk_info(i)
            for i in range(ds.id.get_num_chunks())
            if ds.id.get_chunk_info(i).chunk_offset == (4, 16, 0)
        )
    raw = bytearray(path.read_bytes())
    middle = info.byte_offset + info.size // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    path.write_bytes(bytes(raw))
    volume = open_volume(f"{path}:image")
    np.testing.assert_array_equal(volume[:4], content.image[:4])  # undamaged chunks still read
    with pytest.raises(
        VolumeReadError,
        match=rf"{path}:image: cannot read chunk z 4:6, y 16:32, x 0:16 "
        r"\(reading z 0:8, y 0:32, x 0:32\); the file is damaged",
    ):
        volume[:]
    checkpoint = tiny_checkpoint(tmp_path / "m.pt")
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--image", f"{path}:image", "--out", str(tmp_path / "p.h5")])
        == 2
    )
    err = one_line_error(capsys, "predict")
    assert f"{path}:image: cannot read chunk z 4:6, y 16:32, x 0:16" in err


def test_truncated_png_slice_names_the_file_and_z(tmp_path, content):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, plane in enumerate(content.image):
        Image.fromarray(plane).save(folder / f"s{z}.png")
    damaged = folder / "s5.png"
    damaged.write_bytes(damaged.read_bytes()[:-200])
    volume = open_volume(folder)
    assert volume.shape == content.image.shape  # the header alone still reads
    with pytest.raises(VolumeReadError, match=rf"{damaged}: cannot read slice z=5 of {folder}; the file is damaged"):
        volume[3:7]
    sampler = PatchSampler((folder, content.labels), (8, 16, 16), foreground_bias=0.0)
    with pytest.raises(VolumeReadError, match="s5.png: cannot read slice z=5"):
        sampler.batch(0)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.99])
def test_truncated_tiff_is_refused_at_open(tmp_path, content, compression, keep):
    """tifffile stops at the first page it cannot reach and only logs it: a cut stack would
    otherwise open as a shorter one."""
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, content.image, compression=compression)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VolumeReadError, match=rf"{path}: (truncated|damaged)"):
        open_volume(path)


def test_damaged_tiff_page_names_the_page(tmp_path, content):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, content.image, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[6]
        start, count = page.dataoffsets[0], page.databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[start + count // 2 : start + count // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    volume = open_volume(path)
    np.testing.assert_array_equal(volume[:6], content.image[:6])
    with pytest.raises(VolumeReadError, match=rf"{path}: cannot read page z=6; the file is damaged"):
        volume[4:8]


def test_empty_volumes_are_refused_at_open(tmp_path, capsys):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", shape=(0, 16, 16), dtype=np.uint8)
        f.create_dataset("label", shape=(0, 16, 16), dtype=np.uint8)
    with pytest.raises(InputError, match=rf"{path}:image is empty \(shape \(0, 16, 16\)\)"):
        open_volume(f"{path}:image")
    with pytest.raises(InputError, match=r"is empty"):
        PatchSampler((np.zeros((0, 16, 16), np.uint8), None), PATCH)
    assert (
        main(
            [
                "train",
                "--config",
                str(write_yaml(tmp_path)),
                "--image",
                f"{path}:image",
                "--label",
                f"{path}:label",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "empty.h5:image is empty" in one_line_error(capsys, "train")
