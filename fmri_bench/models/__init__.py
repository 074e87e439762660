"""Models: the spatiotemporal flat-map MAE (``mae``). A model is built one way,
``MaskedAutoencoderViT(preset_config(name, **overrides))``, and read back with ``from_pretrained``."""

from fmri_bench.models.mae import PRESETS, MAEConfig, MaskedAutoencoderViT, from_pretrained, preset_config

__all__ = ["PRESETS", "MAEConfig", "MaskedAutoencoderViT", "from_pretrained", "preset_config"]
