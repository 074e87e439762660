"""The one clip path: the grid's unmask / pool against plain numpy, the sampler's rules, and the
benchmark reader giving exactly the clips pretraining reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmri_bench.clips import (
    ClipDataset, clip_image, clip_requests, event_frame, random_starts, read_clips, sequential_starts,
)
from fmri_bench.grid import FlatGrid, downsample, grid_of
from fmri_bench.shards import ShardWriter

H, W = 6, 8


@pytest.fixture
def mask(rng):
    m = rng.random((H, W)) > 0.4
    m[:2, :2] = False  # one 2 x 2 block without brain
    return m


def test_unmask_puts_pixels_in_row_major_mask_order(mask, rng):
    grid = FlatGrid(mask)
    x = torch.from_numpy(rng.normal(size=(3, int(mask.sum()))).astype(np.float32))
    img = grid.unmask(x)
    assert img.shape == (3, H, W)
    ref = np.zeros((3, H, W), np.float32)
    ref[:, mask] = x.numpy()
    np.testing.assert_array_equal(img.numpy(), ref)
    with pytest.raises(ValueError, match="pixel values for a mask"):
        grid.unmask(x[:, 1:])


def test_pool_is_the_block_mean_of_brain_pixels(mask, rng):
    grid = FlatGrid(mask)
    x = rng.normal(size=(4, int(mask.sum()))).astype(np.float32)
    coarse = grid.coarse(2)
    blocks = mask.reshape(H // 2, 2, W // 2, 2)
    assert np.array_equal(coarse.mask.numpy(), blocks.any((1, 3))) and not coarse.mask[0, 0]
    full = np.zeros((4, H, W), np.float32)
    full[:, mask] = x
    ref = (full.reshape(4, H // 2, 2, W // 2, 2) * blocks).sum((2, 4))[:, coarse.mask.numpy()] \
        / blocks.sum((1, 3))[coarse.mask.numpy()]
    np.testing.assert_allclose(grid.pool(torch.from_numpy(x), 2).numpy(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible by downsample=4"):
        grid.coarse(4)


def test_downsample_of_full_images_matches_the_pixel_path(mask, rng):
    x = torch.from_numpy(rng.normal(size=(2, 1, 3, int(mask.sum()))).astype(np.float32))
    grid = grid_of(mask)
    imgs = grid.unmask(x)  # (2, 1, 3, H, W)
    bold, m = downsample(imgs, torch.from_numpy(mask).expand(2, -1, -1), 2)
    assert bold.shape == (2, 1, 3, H // 2, W // 2) and m.shape == (2, H // 2, W // 2)
    torch.testing.assert_close(bold, grid.coarse(2).unmask(grid.pool(x, 2)))
    assert grid_of(mask.copy()) is grid  # equal masks share one grid


def test_sampler_rules():
    assert [event_frame(t, 1.0) for t in (0.0, 2.49, 2.5, 3.5)] == [0, 2, 3, 4]  # halves up
    assert event_frame(10.0, 2.0, hrf_delay=5.0) == 8
    assert list(sequential_starts(40, 16)) == [0, 16] and list(sequential_starts(40, 16, 8)) == [0, 8, 16, 24]
    a = random_starts("run-a", 100, 16, 4.0, seed=0)
    assert len(a) == 25 and a.min() >= 0 and a.max() <= 84 and np.all(np.diff(a) >= 0)
    assert np.array_equal(a, random_starts("run-a", 100, 16, 4.0, seed=0))
    assert not np.array_equal(a, random_starts("run-b", 100, 16, 4.0, seed=0))
    assert not np.array_equal(a, random_starts("run-a", 100, 16, 4.0, seed=0, epoch=1))


def test_benchmark_reader_gives_the_clips_pretraining_reads(tmp_path, mask, rng):
    """read_clips + clip_image (the harness) and ClipDataset (pretraining) agree bit for bit."""
    P = int(mask.sum())
    runs = {f"run{i}": (3 * rng.normal(size=(40, P)) + 1).astype(np.float16) for i in range(3)}
    with ShardWriter(tmp_path, shard_size=2) as w:
        for key, bold in runs.items():
            w.write(key, bold, mask, {"tr": 1.0}, [])
    for f in (1, 2):
        streamed = list(ClipDataset(tmp_path, mode="sequential", downsample=f))
        wanted = clip_requests([c["key"] for c in streamed], [c["start"] for c in streamed])
        read = {i: clip_image(frames, grid, f) for i, frames, grid in read_clips(sorted(tmp_path.glob("*.tar")),
                                                                               wanted, 16)}
        assert sorted(read) == list(range(len(streamed))) == list(range(6))
        for i, c in enumerate(streamed):
            image, m = read[i]
            assert torch.equal(image, c["bold"]) and torch.equal(m, c["mask"])
            if f == 1:  # per-frame z-score over the brain pixels, clipped at 3
                raw = runs[c["key"]][c["start"]:c["start"] + 16].astype(np.float64)
                ref = np.clip((raw - raw.mean(1, keepdims=True)) / raw.std(1, keepdims=True), -3, 3)
                np.testing.assert_allclose(image[0][:, m].numpy(), ref, atol=1e-5)
