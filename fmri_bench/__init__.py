"""fmri_bench: flat-map ViT MAE and language-aligned fMRI models, reproduced end to end, offline.

Modules, one job each, in data-flow order (the README has the map): ``surfaces``, ``flatmap``,
``io``, ``preprocess``, ``shards``, ``convert``, ``synth``, ``grid``, ``clips``, ``models``,
``streams``, ``distributed``, ``rundir``, ``train``, ``splits``, ``probe``, ``baselines``,
``harness`` (datasets, tasks, features, evaluate, plots), ``scaling``, ``results``, ``book``, ``cli``.
"""

from fmri_bench.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
