"""Models: the spatiotemporal flat-map MAE (``mae``); the tokenizer and fMRI-LM live beside it."""

from fmri_bench.models.mae import (
    PRESETS,
    MAEConfig,
    MaskedAutoencoderViT,
    from_pretrained,
    mae_vit_base,
    mae_vit_small,
    mae_vit_tiny,
)

__all__ = [
    "PRESETS", "MAEConfig", "MaskedAutoencoderViT", "from_pretrained",
    "mae_vit_base", "mae_vit_small", "mae_vit_tiny",
]
