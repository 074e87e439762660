"""The example training configs in configs/ load, and each fits its model's input grid."""

from pathlib import Path

import pytest

from fmri_bench.flatmap import DEFAULT_SHAPE
from fmri_bench.models.mae import preset_config
from fmri_bench.train import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("pretrain_*.yaml"))  # MAE configs (tokenizer_*: test_tokenizer)
PEAK_LR = {"pretrain_base_paper.yaml": 1.25e-4, "pretrain_tiny_cpu.yaml": 1e-3}


def test_configs_exist():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_matches_grid(path):
    cfg = load_config(str(path))
    model = preset_config(cfg.model, **cfg.model_overrides)
    H, W = DEFAULT_SHAPE["fs_LR_32k"]
    ds = cfg.data.downsample
    assert tuple(model.img_size) == (H // ds, W // ds), f"{path.name}: downsample {ds} does not fit {cfg.model}"
    # the peak learning rates the configs' comments state (upstream trains ViT-B at 1.25e-4, batch 32)
    assert cfg.lr == pytest.approx(PEAK_LR[path.name])
