"""The benchmark harness: datasets and runs -> task clips -> features -> evaluation -> table rows.

``datasets`` (where a benchmark reads from), ``tasks`` (the clips and splits of each question),
``features`` (one extractor per method), ``evaluate`` (``benchmark()``: probes and baselines on
shared splits), ``plots`` (what the chapters draw). Records and their one table format live in
``fmri_bench.results``. The names below are the harness's public API.
"""

from fmri_bench.harness.datasets import Dataset, RunInfo, cohort_shards, load_dataset, run_identity, scan_runs
from fmri_bench.harness.evaluate import (
    BASELINES, DEFAULT_ATLAS, METHODS, Benchmark, benchmark, chance_sentence, compare_sentence, method_inputs,
    trait_truth, write_benchmark,
)
from fmri_bench.harness.features import (
    EncoderExtractor, OracleExtractor, ParcelExtractor, extract, load_encoder, pixel_parcels_for,
    true_condition_templates, untrained_encoder,
)
from fmri_bench.harness.plots import class_accuracy, confusion, plot_class_maps, plot_confusion, plot_scores, token_evidence
from fmri_bench.harness.tasks import CLIP_LEN, TASKS, TRAITS, Clips, class_map, splits_for, task_clips, trait_folds

__all__ = [
    "BASELINES", "CLIP_LEN", "class_accuracy", "DEFAULT_ATLAS", "METHODS", "TASKS", "TRAITS", "Benchmark", "Clips", "Dataset",
    "EncoderExtractor", "OracleExtractor", "ParcelExtractor", "RunInfo", "benchmark", "class_map",
    "chance_sentence", "cohort_shards", "compare_sentence", "confusion", "extract", "load_dataset", "load_encoder",
    "method_inputs", "pixel_parcels_for", "plot_class_maps", "plot_confusion", "plot_scores", "run_identity",
    "scan_runs", "splits_for", "task_clips", "token_evidence", "trait_truth", "trait_folds",
    "true_condition_templates", "untrained_encoder", "write_benchmark",
]
