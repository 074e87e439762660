"""Shards: byte-exact round trip, upstream layout, atomic writes, clips, rank / worker split."""

from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np
import pytest
import scipy.sparse
import torch
import webdataset as wds

from fmri_bench.clips import ClipDataset, collate, split_shards
from fmri_bench.shards import ShardWriter, decode_mask, encode_mask, expand_urls, iter_samples

H, W = 6, 8


@pytest.fixture
def mask(rng):
    m = rng.random((H, W)) > 0.35
    m[0, 0] = True
    return m


def make_runs(rng, mask, lengths, events=None, tr=1.0):
    """[(key, bold (T, P) float16, meta, events)] with distinct keys."""
    runs = []
    for i, n in enumerate(lengths):
        bold = (rng.standard_normal((n, int(mask.sum()))) * 2 + 1).astype(np.float16)
        meta = {"space": "toy", "tr": tr, "source": f"sub-{i:02d}_bold.nii"}
        runs.append((f"sub-{i:02d}_task-rest", bold, meta, list(events or [])))
    return runs


def write_runs(out, runs, mask, **kw):
    with ShardWriter(out, **kw) as sink:
        for key, bold, meta, events in runs:
            sink.write(key, bold, mask, meta, events)
    return sink.paths


# ----------------------------------------------------------------------------- writer / reader


def test_round_trip_bytes_equal(tmp_path, rng, mask):
    events = [{"onset": 2.5, "duration": 3.0, "trial_type": "go"}]
    runs = make_runs(rng, mask, [20, 17, 33], events)
    paths = write_runs(tmp_path, runs, mask, shard_size=2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar"]

    got = list(iter_samples(tmp_path))
    assert [s["key"] for s in got] == [r[0] for r in runs]
    for (key, bold, meta, ev), s in zip(runs, got):
        assert s["bold"].dtype == np.float16
        assert s["bold"].tobytes() == bold.tobytes()
        assert np.array_equal(s["mask"], mask)
        assert s["meta"] == {**meta, "n_frames": len(bold)}
        assert s["events"] == ev

    # the stored npy member is exactly np.save's bytes of the array
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        raw = tar.extractfile(f"{runs[0][0]}.bold.npy").read()
    assert names[:4] == [f"{runs[0][0]}.{m}" for m in
                         ("bold.npy", "events.json", "mask.npz", "meta.json")]
    buf = io.BytesIO()
    np.save(buf, runs[0][1])
    assert raw == buf.getvalue()


def test_mask_npz_is_upstream_sparse_coo(mask):
    data = encode_mask(mask)
    # upstream writes scipy.sparse.save_npz(coo) and reads row / col / data / shape back
    npz = np.load(io.BytesIO(data))
    assert sorted(npz.files) == ["col", "data", "format", "row", "shape"]
    dense = scipy.sparse.coo_array((npz["data"], (npz["row"], npz["col"])),
                                   shape=npz["shape"]).toarray()
    assert np.array_equal(dense, mask)
    assert np.array_equal(scipy.sparse.load_npz(io.BytesIO(data)).toarray(), mask)
    assert np.array_equal(decode_mask(data), mask)
    # a dense npz under "mask" is read too
    buf = io.BytesIO()
    np.savez(buf, mask=mask)
    assert np.array_equal(decode_mask(buf.getvalue()), mask)


def test_reads_upstream_written_shard(tmp_path, rng, mask):
    """A shard laid out like the published fmri-fm ones (scipy save_npz, np.save, json)."""
    bold = rng.standard_normal((18, int(mask.sum()))).astype(np.float16)
    members = {}
    for name, obj in (("bold.npy", bold),):
        buf = io.BytesIO()
        np.save(buf, obj)
        members[name] = buf.getvalue()
    buf = io.BytesIO()
    scipy.sparse.save_npz(buf, scipy.sparse.coo_array(mask), compressed=False)
    members["mask.npz"] = buf.getvalue()
    meta = {"sub": "100206", "mod": "tfMRI", "task": "WM", "mag": "3T", "dir": "LR",
            "n_frames": 18}
    members["meta.json"] = json.dumps(meta).encode()
    members["events.json"] = json.dumps(
        [{"onset": 1.2, "duration": 2.0, "trial_type": "2bk_body"}]).encode()
    path = tmp_path / "hcp-flat_0000.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        sink.write({"__key__": "sub-100206_mod-tfMRI_task-WM_mag-3T_dir-LR", **members})

    (s,) = iter_samples(str(path))
    assert s["bold"].tobytes() == bold.tobytes()
    assert np.array_equal(s["mask"], mask) and s["meta"] == meta
    (clip,) = ClipDataset(str(path), mode="event", clip_len=16)
    assert clip["start"] == 1 and clip["label"] == "2bk_body"  # upstream meta has no tr: 1 s


def test_shard_names_and_index_step(tmp_path, rng, mask):
    runs = make_runs(rng, mask, [4] * 5)
    paths = write_runs(tmp_path, runs, mask, shard_size=2, prefix="hcp", start_index=1,
                       index_step=3)
    assert [p.name for p in paths] == ["hcp-000001.tar", "hcp-000004.tar", "hcp-000007.tar"]
    assert [len(list(iter_samples(str(p)))) for p in paths] == [2, 2, 1]


def test_crash_mid_shard_leaves_no_partial_tar(tmp_path, rng, mask):
    runs = make_runs(rng, mask, [5] * 3)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_size=2) as sink:
            for key, bold, meta, events in runs:
                sink.write(key, bold, mask, meta, events)
            raise RuntimeError("crash while shard-000001 is half written")
    # the full first shard survives; the half one is gone, temp file included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    assert [s["key"] for s in iter_samples(tmp_path)] == [runs[0][0], runs[1][0]]


def test_killed_writer_leaves_only_tmp(tmp_path, rng, mask):
    (key, bold, meta, events), = make_runs(rng, mask, [5])
    sink = ShardWriter(tmp_path, shard_size=4)
    sink.write(key, bold, mask, meta, events)  # process "dies" here: never closed
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar.tmp"]
    assert expand_urls(tmp_path) == []  # readers never see the temp file
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_shards_are_byte_reproducible(tmp_path, rng, mask, monkeypatch):
    runs = make_runs(rng, mask, [7, 9, 3],
                     [{"onset": 0.5, "duration": 1.0, "trial_type": "a"}])
    first = write_runs(tmp_path / "a", runs, mask, shard_size=2)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 12345.0)  # a later "clock"
    second = write_runs(tmp_path / "b", runs, mask, shard_size=2)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_bad_samples_rejected(tmp_path, rng, mask):
    bold = np.zeros((4, int(mask.sum())), np.float16)
    with ShardWriter(tmp_path) as sink:
        with pytest.raises(ValueError, match="letters"):
            sink.write("sub-01.run-1", bold, mask, {})
        with pytest.raises(ValueError, match="float16"):
            sink.write("a", bold.astype(np.float32), mask, {})
        with pytest.raises(ValueError, match="pixels"):
            sink.write("a", bold[:, :-1], mask, {})
        sink.write("a", bold, mask, {})
        with pytest.raises(ValueError, match="duplicate"):
            sink.write("a", bold, mask, {})
    assert [s["key"] for s in iter_samples(tmp_path)] == ["a"]


def test_expand_urls(tmp_path, rng, mask):
    paths = write_runs(tmp_path, make_runs(rng, mask, [3] * 3), mask, shard_size=1)
    names = [str(p) for p in paths]
    assert expand_urls(tmp_path) == names
    assert expand_urls(str(tmp_path / "shard-*.tar")) == names
    assert expand_urls(str(tmp_path / "shard-{000000..000002}.tar")) == names
    assert expand_urls(paths[::-1]) == names[::-1]


# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_split_shards_covers_every_shard_once(world, workers):
    shards = [f"s{i}" for i in range(11)]
    taken = [s for r in range(world) for k in range(workers)
             for s in split_shards(shards, r, world, k, workers)]
    assert sorted(taken) == sorted(shards)
    assert split_shards(shards, 1, 2, 0, 2) == ["s1", "s5", "s9"]


def test_clip_dataset_ranks_and_dataloader_workers(tmp_path, rng, mask):
    runs = make_runs(rng, mask, [16] * 10)
    write_runs(tmp_path, runs, mask, shard_size=1)
    seen = []
    for rank in range(2):
        ds = ClipDataset(tmp_path, mode="sequential", rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen += [clip["key"] for clip in loader]
    assert sorted(seen) == sorted(r[0] for r in runs)


# ----------------------------------------------------------------------------- clips


def test_sequential_clips_and_short_runs(tmp_path, rng, mask):
    write_runs(tmp_path, make_runs(rng, mask, [40, 10, 16]), mask)
    ds = ClipDataset(tmp_path, mode="sequential", clip_len=16)
    clips = list(ds)
    assert [(c["key"][:6], c["start"]) for c in clips] == [
        ("sub-00", 0), ("sub-00", 16), ("sub-02", 0)]
    assert ds.stats == {"runs": 3, "clips": 3, "skipped_short": 1}
    c = clips[0]
    assert c["bold"].shape == (1, 16, H, W) and c["bold"].dtype == torch.float32
    assert c["mask"].dtype == torch.bool and torch.equal(c["mask"], torch.from_numpy(mask))
    assert "label" not in c


def test_random_clips_counts_starts_and_seeding(tmp_path, rng, mask):
    write_runs(tmp_path, make_runs(rng, mask, [40, 64]), mask)

    def starts(epoch=0, **kw):
        ds = ClipDataset(tmp_path, mode="random", clip_len=16, seed=3, **kw)
        ds.set_epoch(epoch)
        out = {}
        for c in ds:
            out.setdefault(c["key"], []).append(c["start"])
        return out

    a = starts()
    assert [len(v) for v in a.values()] == [int(4 * 40 / 16), int(4 * 64 / 16)]  # 10, 16
    assert all(v == sorted(v) for v in a.values())
    assert max(a["sub-00_task-rest"]) <= 40 - 16 and min(min(v) for v in a.values()) >= 0
    assert len(set(a["sub-01_task-rest"])) > 8  # spread over the run, not one start
    assert starts() == a  # same seed and epoch -> same clips
    assert starts(epoch=1) != a
    assert [len(v) for v in starts(oversample=1.0).values()] == [2, 4]


def test_event_clips_align_with_tr_and_labels(tmp_path, rng, mask):
    events = [
        {"onset": 3.4, "duration": 2.0, "trial_type": "face"},   # round(3.4 / 1) = 3
        {"onset": 7.5, "duration": 2.0, "trial_type": "place"},  # 7.5 -> 8 (half up)
        {"onset": 20.0, "duration": 2.0, "trial_type": "tool"},  # 20 + 16 > 30: dropped
        {"onset": 0.0, "duration": 2.0, "trial_type": "fix"},
    ]
    write_runs(tmp_path / "tr1", make_runs(rng, mask, [30], events, tr=1.0), mask)
    clips = list(ClipDataset(tmp_path / "tr1", mode="event"))
    assert [(c["start"], c["label"]) for c in clips] == [(3, "face"), (8, "place"), (0, "fix")]

    write_runs(tmp_path / "tr2", make_runs(rng, mask, [30], events, tr=2.0), mask)
    clips = list(ClipDataset(tmp_path / "tr2", mode="event"))  # TR from meta.json
    assert [c["start"] for c in clips] == [2, 4, 10, 0]
    clips = list(ClipDataset(tmp_path / "tr2", mode="event", hrf_delay=2.0,
                             label_map={"face": 0, "tool": 2}))
    assert [(c["start"], c["label"]) for c in clips] == [(3, 0), (11, 2)]
    batch = collate(clips)
    assert batch["label"].tolist() == [0, 2] and batch["bold"].shape == (2, 1, 16, H, W)
    assert batch["start"].tolist() == [3, 11]


def test_clip_normalisation(tmp_path, rng, mask):
    (key, bold, meta, events), = make_runs(rng, mask, [16])
    bold[5, 3] = 60.0  # an outlier: clipped at +3
    write_runs(tmp_path, [(key, bold, meta, events)], mask)
    (clip,) = ClipDataset(tmp_path, mode="sequential")
    x = clip["bold"][0]                                    # (16, H, W)
    assert torch.all(x[:, ~torch.from_numpy(mask)] == 0)  # outside the mask: zero
    pix = x[:, torch.from_numpy(mask)].numpy()             # (16, P) in row-major pixel order
    ref = bold.astype(np.float32)
    ref = (ref - ref.mean(1, keepdims=True)) / ref.std(1, keepdims=True)
    assert np.abs(pix).max() <= 3.0
    assert pix[5].max() == pytest.approx(3.0)
    assert np.allclose(pix, np.clip(ref, -3, 3), atol=1e-4)
    unclipped = np.abs(ref).max(1) < 3
    assert unclipped.sum() >= 8
    assert np.allclose(pix[unclipped].mean(1), 0, atol=1e-5)
    assert np.allclose(pix[unclipped].std(1), 1, atol=1e-4)


def test_clip_dataset_shuffle_is_seeded(tmp_path, rng, mask):
    write_runs(tmp_path, make_runs(rng, mask, [32] * 6), mask, shard_size=1)

    def order(seed):
        ds = ClipDataset(tmp_path, mode="sequential", shuffle=True, buffer_size=4, seed=seed)
        return [(c["key"], c["start"]) for c in ds]

    a = order(0)
    assert a == order(0) and sorted(a) == sorted(order(1))
    assert len(a) == 12 and a != sorted(a)


def test_clip_downsample_is_the_block_mean_of_brain_pixels(tmp_path, rng, mask):
    write_runs(tmp_path, make_runs(rng, mask, [16, 20]), mask)
    full = list(ClipDataset(tmp_path, mode="sequential"))
    pooled = list(ClipDataset(tmp_path, mode="sequential", downsample=2))
    assert len(full) == len(pooled) == 2
    blocks = mask.reshape(H // 2, 2, W // 2, 2)
    for a, b in zip(full, pooled):
        assert b["bold"].shape == (1, 16, H // 2, W // 2) and b["mask"].shape == (H // 2, W // 2)
        assert np.array_equal(b["mask"].numpy(), blocks.any((1, 3)))
        x = a["bold"][0].numpy().reshape(16, H // 2, 2, W // 2, 2)
        with np.errstate(invalid="ignore"):
            ref = np.nan_to_num((x * blocks).sum((2, 4)) / blocks.sum((1, 3)))  # 0 where no brain
        np.testing.assert_allclose(b["bold"][0].numpy(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by downsample=4"):
        next(iter(ClipDataset(tmp_path, mode="sequential", downsample=4)))  # 6 x 8 grid
