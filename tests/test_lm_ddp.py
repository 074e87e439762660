"""Stage-2 (and stage-3) training data-parallel (gloo, 2 CPU ranks started as torchrun would, killed after
step 2 and resumed) against one process on the same global batches: the same trained adapter
and heads and the same logged losses; batch sizes the ranks cannot split are refused."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fmri_bench.errors import InputError
from fmri_bench.lm_instruct import instruct_train
from fmri_bench.lm_train import train
from tests.test_fmri_lm import _cfg, tiny_llm

SETTINGS = dict(steps=3, batch_size=4, t2t_batch_size=2, log_every=1, eval_every=0, ckpt_every=2, device="cpu",
                lr=0.5, model_overrides={"precision": "fp32", "lora_dropout": 0.0})


class _SGD(torch.optim.SGD):
    """Plain SGD in place of AdamW: an update linear in the gradient (Adam's first steps are
    about lr x sign(gradient), so rounding flips them where a gradient is ~0)."""

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, lr=lr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, settings: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.optim.AdamW = _SGD
    from pathlib import Path

    cfg = _cfg(Path(tmp) / f"cfg{rank}", **settings)
    part = train(cfg, Path(tmp) / "run", stop_at=2, llm=tiny_llm())  # killed after step 2 ...
    assert part["step"] == 2
    res = train(cfg, Path(tmp) / "run", resume=True, llm=tiny_llm())  # ... every rank resumes from rank 0's file
    torch.save({"trainable": res["model"].trainable_state_dict(), "history": res["history"]},
               Path(tmp) / f"rank{rank}.pt")


def test_two_ranks_train_what_one_process_trains(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    res1 = train(_cfg(tmp_path, **SETTINGS), None, llm=tiny_llm())
    one = res1["model"].trainable_state_dict()
    for r in range(2):
        (tmp_path / f"cfg{r}").mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), SETTINGS), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, p in one.items():
        for r in ranks:
            assert torch.allclose(r["trainable"][name], p, atol=2e-5), name
    assert any(not torch.allclose(p, q) for p, q in zip(one.values(), train(
        _cfg(tmp_path, **{**SETTINGS, "steps": 1}), None, llm=tiny_llm())["model"].trainable_state_dict().values()))
    # only rank 0 writes: one record per step in the run's log, and the model file
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    # the logged losses are the global batches' (the ranks' token-weighted shares summed)
    for r, o in zip([r for r in recs if "loss" in r], [o for o in res1["history"] if "loss" in o]):
        for k in ("loss", "f2f", "f2f_acc", "f2t", "t2t"):
            assert r[k] == pytest.approx(o[k], rel=1e-5, abs=1e-6), k
    assert [r["step"] for r in recs if "val_f2t" in r] == [0, 3]
    assert (tmp_path / "run" / "fmri_lm.pt").is_file() and not any("val_f2t" in r for r in ranks[1]["history"])


def test_batch_sizes_must_divide_by_the_ranks(tmp_path, monkeypatch):
    from fmri_bench import distributed

    monkeypatch.setattr(distributed, "setup", lambda device="auto": distributed.Distributed(rank=0, world=3))
    with pytest.raises(InputError, match="batch_size 4 is not divisible by the 3 ranks"):
        train(_cfg(tmp_path, **SETTINGS), None, llm=tiny_llm())


def test_effective_batch_sizes_are_checked():
    from fmri_bench.lm_train import check_divisible

    check_divisible(2, batch_size=4, t2t_batch_size=0)
    with pytest.raises(InputError, match=r"^t2t_batch_size 3 is not divisible by the 2 ranks \(5 T2T paragraphs\)$"):
        check_divisible(2, " (5 T2T paragraphs)", batch_size=4, t2t_batch_size=3)


def _instruct_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.optim.AdamW = _SGD
    from pathlib import Path

    from fmri_bench import distributed

    dd = distributed.setup("cpu")
    f, exs = _instruct_data()
    run = Path(tmp) / "irun"
    part = instruct_train(_instruct_model(), f, exs, steps=3, batch_size=4, lr=0.5, run_dir=run, ckpt_every=1,
                          stop_at=2, dd=dd)  # killed after step 2 ...
    assert len(part) == 2
    model = _instruct_model()
    hist = instruct_train(model, f, exs, steps=3, batch_size=4, lr=0.5, run_dir=run, resume=True, ckpt_every=1, dd=dd)
    torch.save({"trainable": model.trainable_state_dict(), "history": hist}, Path(tmp) / f"irank{rank}.pt")
    dd.close()


def _instruct_model():
    from tests.test_lm_instruct import model

    return model(seed=1)


def _instruct_data():
    from fmri_bench import lm_instruct as I
    from tests.test_lm_instruct import planted

    f, labels, subjects = planted()
    texts = ["the brain network coupling is typical."] * len(f)
    # answers of 1 (Male), 2 (36+) and 3 tokens (22-25): the ranks' token counts differ, so the weighting matters
    return f, I.examples(labels, texts, range(len(f)), ["sex", "age_bin"], n_regions=3, seed=0)


def test_instruct_two_ranks_train_what_one_process_trains(tmp_path, one_thread, monkeypatch):
    """Stage 3 data-parallel (2 gloo ranks, killed after step 2 and resumed from rank 0's
    checkpoint) tunes the adapter one process tunes on the same batches and logs its losses."""
    from fmri_bench.lm_instruct import instruct_train

    monkeypatch.setattr(torch.optim, "AdamW", _SGD)
    f, exs = _instruct_data()
    one_model = _instruct_model()
    one_hist = instruct_train(one_model, f, exs, steps=3, batch_size=4, lr=0.5)
    one = one_model.trainable_state_dict()
    mp.spawn(_instruct_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"irank{r}.pt", weights_only=False) for r in range(2)]
    moved = False
    start = _instruct_model().trainable_state_dict()
    for name, p in one.items():
        moved |= not torch.allclose(p, start[name])
        for r in ranks:
            assert torch.allclose(r["trainable"][name], p, atol=2e-5), name
    assert moved  # the check is not trivially met by untrained weights
    for r in ranks:
        assert [h["step"] for h in r["history"]] == [1, 2, 3]
        for h, o in zip(r["history"], one_hist):
            assert h["loss"] == pytest.approx(o["loss"], rel=1e-5, abs=1e-6)
    assert (tmp_path / "irun" / "instruct_checkpoint.pt").is_file()


def test_instruct_batch_must_divide_by_the_ranks():
    from fmri_bench import distributed
    from fmri_bench.lm_instruct import instruct_train

    f, exs = _instruct_data()
    with pytest.raises(InputError, match=r"batch_size 3 is not divisible by the 2 ranks \(48 instruction examples\)"):
        instruct_train(_instruct_model(), f, exs, steps=1, batch_size=3, dd=distributed.Distributed(rank=0, world=2))
