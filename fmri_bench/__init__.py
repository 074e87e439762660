"""fmri_bench: flat-map ViT MAE and language-aligned fMRI models, reproduced end to end, offline.

Modules, one job each (see DESIGN.md): ``surfaces`` (flat surface spaces), ``flatmap``
(vertices <-> flat-map pixels), ``io`` (CIFTI / GIFTI / NIfTI / events readers),
``preprocess`` (z-score, TR resampling), ``shards`` (WebDataset shards and clips),
``convert`` (files -> shards), ``synth`` (the synthetic cohort), ``models`` (MAE, tokenizer,
fMRI-LM), ``train``, ``probe``, ``baselines``, ``decoding`` (the state / trait benchmarks),
``scaling`` (scaling-law sweep and fits), ``results``, ``book`` and ``cli``.
"""

from fmri_bench.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
