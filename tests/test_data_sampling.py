"""Patch sampling: seeded, resumable, worker-independent, foreground-biased, reflect-padded."""

import h5py
import numpy as np
import pytest
import torch

from stt_model.config import load_config
from stt_model.data import (
    ForegroundIndex,
    PatchSampler,
    default_augmentations,
    open_volume,
    read_window,
    synthetic_volume,
)

PATCH = (8, 32, 32)


@pytest.fixture(scope="module")
def pair():
    volume = synthetic_volume((16, 96, 96), seed=3)
    return volume.image, volume.labels


def take(sampler, n):
    return [b for _, b in zip(range(n), iter(sampler))]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_shapes_and_ranges(pair):
    sampler = PatchSampler(pair, PATCH, batch_size=3, out_channels=2, augment=default_augmentations())
    batch = next(iter(sampler))
    assert batch["image"].shape == (3, 1, *PATCH) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (3, 2, *PATCH) and batch["target"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert set(batch["target"].unique().tolist()) <= {0.0, 1.0}
    one = PatchSampler(pair, PATCH, out_channels=1, foreground_bias=0.0)
    assert next(iter(one))["target"].shape == (1, 1, *PATCH)
    image_only = PatchSampler((pair[0], None), PATCH)
    assert set(next(iter(image_only))) == {"image"}


def test_seeded_and_resumable(pair):
    def make(seed=0):
        return PatchSampler(pair, PATCH, batch_size=2, seed=seed, augment=default_augmentations())

    first = take(make(), 5)
    assert same(first, take(make(), 5))
    assert not same(first[:1], take(make(seed=1), 1))
    interrupted = make()
    take(interrupted, 3)
    state = interrupted.state_dict()
    assert state == {"seed": 0, "batch": 3}
    resumed = make(seed=99)
    resumed.load_state_dict(state)
    assert same(take(resumed, 2), first[3:])


def test_dataloader_workers_give_the_same_stream(pair):
    sampler = PatchSampler(pair, PATCH, batch_size=2, seed=4)
    loader = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=2)
    from_workers = [b for _, b in zip(range(4), loader)]
    assert same(from_workers, [sampler.batch(i) for i in range(4)])
    sampler.load_state_dict(sampler.state_dict(batches=2))
    resumed = [b for _, b in zip(range(2), torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=2))]
    assert same(resumed, from_workers[2:])


def test_ranks_draw_disjoint_batches(pair):
    ranks = [PatchSampler(pair, PATCH, seed=0, rank=r, world_size=2) for r in range(2)]
    single = PatchSampler(pair, PATCH, seed=0)
    assert same([ranks[0].batch(0), ranks[1].batch(0)], [single.batch(0), single.batch(1)])


def test_foreground_bias_raises_the_foreground_fraction(pair):
    def fraction(bias):
        sampler = PatchSampler(pair, (4, 16, 16), foreground_bias=bias, out_channels=1, batch_size=8, seed=1)
        return float(torch.cat([b["target"] for b in take(sampler, 4)]).mean())

    background, biased = fraction(0.0), fraction(1.0)
    assert biased > 2 * background and biased > 0.3


def test_foreground_index_reads_block_by_block(pair):
    labels = pair[1]
    reads = []

    class Counting:
        shape, dtype = labels.shape, labels.dtype

        def __getitem__(self, key):
            reads.append(np.asarray(labels[key]).size)
            return labels[key]

    index = ForegroundIndex(Counting(), block=(8, 32, 32))
    assert max(reads) <= 8 * 32 * 32 and index.total == np.count_nonzero(labels)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert labels[index.draw(rng)] != 0
    empty = ForegroundIndex(np.zeros((4, 8, 8), np.uint8))
    assert empty.draw(rng) is None


def test_reflect_padding_on_small_volumes():
    image = np.arange(3 * 5 * 6, dtype=np.uint8).reshape(3, 5, 6)
    window = read_window(image, (0, 0, 0), (8, 12, 6))
    np.testing.assert_array_equal(window, np.pad(image, ((0, 5), (0, 7), (0, 0)), mode="reflect"))
    sampler = PatchSampler((image, (image > 40).astype(np.uint8)), (8, 16, 16), foreground_bias=0.5)
    batch = next(iter(sampler))
    assert batch["image"].shape == (1, 1, 8, 16, 16)
    np.testing.assert_allclose(batch["image"][0, 0, :3, :5, :6].numpy(), image / 255, rtol=1e-6)
    flat = np.ones((1, 4, 4), np.uint8)
    assert read_window(flat, (0, 0, 0), (3, 4, 4)).shape == (3, 4, 4)


def test_lazy_volumes_from_specs(tmp_path, pair):
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=pair[0], chunks=(4, 32, 32))
        f.create_dataset("label", data=pair[1], chunks=(4, 32, 32))
    sampler = PatchSampler((f"{path}:image", f"{path}:label"), PATCH, seed=2)
    assert sampler.foreground[0].block == (4, 32, 32), "the index follows the file's chunks"
    from_file = take(sampler, 2)
    in_memory = take(PatchSampler((pair[0], open_volume(f"{path}:label")), PATCH, seed=2, index_block=(4, 32, 32)), 2)
    assert same(from_file, in_memory)


def test_file_backed_volumes_in_forked_workers(tmp_path, pair):
    """Workers inherit volumes the parent has already read; each must reopen its own handle."""
    import tifffile

    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=pair[1], chunks=(4, 32, 32), compression="gzip")
    tifffile.imwrite(tmp_path / "image.tif", pair[0], compression="zlib")
    sampler = PatchSampler((str(tmp_path / "image.tif"), f"{path}:label"), PATCH, batch_size=2, seed=5)
    sampler.batch(0)
    context = torch.multiprocessing.get_context("fork")
    loader = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=2, multiprocessing_context=context)
    from_workers = [b for _, b in zip(range(6), loader)]
    in_memory = PatchSampler(pair, PATCH, batch_size=2, seed=5, index_block=(4, 32, 32))
    assert same(from_workers, take(in_memory, 6))


def test_from_config(pair):
    config = load_config({"base": "tiny-cpu", "data": {"patch": [4, 16, 16], "augment": False}})
    sampler = PatchSampler.from_config([pair, pair], config)
    batch = next(iter(sampler))
    assert batch["image"].shape == (config.train.batch_size, 1, 4, 16, 16)
    assert batch["target"].shape[1] == config.model.out_channels
    assert sampler.augment is None and sampler.seed == config.train.seed


def test_bad_arguments(pair):
    with pytest.raises(ValueError, match="differ in shape"):
        PatchSampler((pair[0], pair[1][:4]), PATCH)
    with pytest.raises(ValueError, match="foreground_bias"):
        PatchSampler(pair, PATCH, foreground_bias=1.5)
    with pytest.raises(ValueError, match="patch must be"):
        PatchSampler(pair, (8, 32))
