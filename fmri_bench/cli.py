"""The ``fmri-bench`` command: a thin layer over library functions.

Each subcommand parses its options and calls one function of the library; the notebooks and
the tests call the same functions. Errors the user can fix (``InputError``) print one line
and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from fmri_bench.errors import InputError


# --- flatten ---------------------------------------------------------------------------------
def _add_flatten(sub) -> None:
    p = sub.add_parser("flatten", help="convert fMRI files (CIFTI / GIFTI / NIfTI) to flat-map shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="dtseries/dscalar .nii, func.gii, or NIfTI volume")
    p.add_argument("--out", required=True, help="output directory for the .tar shards")
    p.add_argument("--space", default=None, choices=["fs_LR_32k", "fsaverage5"],
                   help="surface space (default: from the file type)")
    p.add_argument("--tr", type=float, default=1.0, help="target repetition time in seconds (default 1.0)")
    p.add_argument("--input-tr", type=float, default=None, help="override the TR read from the header")
    p.add_argument("--events", nargs="*", default=None,
                   help="events files (BIDS events.tsv or an HCP EVs directory), one per input")
    p.add_argument("--shard-size", type=int, default=32, help="runs per shard")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--shard-index", type=int, default=0, help="this job's index when split over jobs")
    p.add_argument("--num-shards", type=int, default=1, help="number of independent jobs")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep this job's shards already in --out and convert only the runs not in them, or whose inputs changed")
    again.add_argument("--overwrite", action="store_true", help="replace this job's shards already in --out")
    p.set_defaults(func=_run_flatten)


def _run_flatten(args) -> int:
    from fmri_bench.convert import flatten

    summary = flatten(
        args.inputs, args.out, space=args.space, tr=args.tr, input_tr=args.input_tr,
        events=args.events, shard_size=args.shard_size, workers=args.workers,
        shard_index=args.shard_index, num_shards=args.num_shards, progress=True,
        resume=args.resume, overwrite=args.overwrite,
    )
    print(summary.line())
    return 0 if not summary.failed else 2


# --- book ------------------------------------------------------------------------------------
def _add_book(sub) -> None:
    p = sub.add_parser("book", help="execute the chapter notebooks (papermill) and build the HTML book")
    p.add_argument("--profile", default="book", choices=["smoke", "book"],
                   help="smoke: seconds per chapter (CI); book: the full chapters (default)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these notebooks (01, 01_flat_maps or the file name)")
    p.add_argument("--no-build", action="store_true", help="execute the notebooks, skip the HTML build")
    p.add_argument("--strict", action="store_true", help="fail the HTML build on any Sphinx warning")
    p.add_argument("--notebooks", default=None, help="directory of source notebooks (default notebooks/)")
    p.add_argument("--out", default=None,
                   help="directory for executed notebooks and results (default book/; the HTML build needs it)")
    p.add_argument("--no-browser-check", action="store_true",
                   help="skip loading the built pages in headless Chromium (run when a browser is present)")
    p.set_defaults(func=_run_book)


def _run_book(args) -> int:
    from pathlib import Path

    from fmri_bench.book import NotebookError, build_book, run_notebooks

    notebooks = None
    if args.notebooks is not None:
        notebooks = sorted(Path(args.notebooks).glob("*.ipynb"))
        if not notebooks:
            raise InputError("no notebooks (*.ipynb) found", args.notebooks)
    if args.out is not None and not args.no_build:
        raise InputError("--out is for executing only: add --no-build (the HTML build reads book/)")
    try:
        runs = run_notebooks(args.profile, notebooks, out_dir=args.out, only=args.only)
        print(f"{len(runs)} notebooks executed in {sum(r.seconds for r in runs):.1f} s ({args.profile})")
        if not args.no_build:
            index = build_book(strict=args.strict)
            if not args.no_browser_check:
                return _browser_check(Path(index).parent)
    except NotebookError as err:
        print(f"fmri-bench book: error: {err}", file=sys.stderr)
        return 1
    return 0


def _browser_check(html) -> int:
    from pathlib import Path

    from fmri_bench.book import book_dir
    from fmri_bench.bookcheck import chapter_pages, check_site, find_browser

    browser = find_browser()
    if browser is None:
        print("browser check SKIPPED: no chromium / chromedriver on PATH "
              "(apt-get install chromium chromium-driver to run it)", flush=True)
        return 0
    pages = chapter_pages(book_dir()) + ["results.html"]  # the chapters and the results page
    found = check_site(html, pages, browser, screenshots=Path(html).parent / "screenshots")
    problems = [p for p in found if not p.offline]
    for p in found:
        print(f"fmri-bench book: browser check: {p.line()}", file=sys.stderr if not p.offline else sys.stdout)
    notes = len(found) - len(problems)
    print(f"browser check: {len(pages) + 1} pages in {browser[0]}, {len(problems)} problems"
          + (f", {notes} external assets not reachable offline" if notes else ""), flush=True)
    return 1 if problems else 0


# --- pretrain --------------------------------------------------------------------------------
def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the flat-map MAE (resumable; DDP under torchrun)")
    p.add_argument("--config", default=None, help="YAML TrainConfig (default: the tiny CPU settings)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys and YAML values: steps=1000 data.downsample=2 "
                        "model_overrides.depth=6")
    p.add_argument("--run-dir", required=True, help="directory for config, metrics, checkpoints, figures")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    import os

    from fmri_bench.train import load_config, train

    metrics = train(load_config(args.config, args.overrides), args.run_dir, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"step {metrics['step']}: train loss {metrics['train_loss']:.4f}, val {metrics['val_loss']}, "
              f"val OOD {metrics['val_ood_loss']}, {metrics['clips_per_s']:.1f} clips/s -> {args.run_dir}")
    return 0


# --- simulate --------------------------------------------------------------------------------
def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="generate the synthetic HCP-like cohort with its ground truth")
    p.add_argument("--profile", default="smoke", help="smoke | book | scaling (default smoke)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--subjects", type=int, default=None, help="number of subjects (default: the profile's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    p.add_argument("--overwrite", action="store_true", help="replace a cohort already in --out")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args) -> int:
    from fmri_bench.synth import simulate

    print(simulate(args.profile, args.out, subjects=args.subjects, seed=args.seed, progress=True,
                   overwrite=args.overwrite).line())
    return 0


# --- probe / baseline --------------------------------------------------------------------------
def _add_bench_args(p) -> None:
    # names checked by fmri_bench.harness (InputError, exit 2): building the parser imports no torch
    p.add_argument("--task", required=True, help="state21 | sex | age | fluid_iq | identify")
    p.add_argument("--data", default=None,
                   help="simulated cohort or directory of flat-map shards with participants.tsv, or a "
                        "dataset name from `fmri-bench data list` (default: the smoke synthetic cohort)")
    p.add_argument("--out", default=None, help="results JSON (a markdown table is written beside it)")
    p.add_argument("--seeds", type=int, default=5,
                   help="subject-disjoint re-splits / probe seeds (default 5; identify: bootstrap CI instead)")
    p.add_argument("--representations", nargs="+", default=["cls", "avg_patch"],
                   choices=["cls", "avg_patch", "patch"], help="MAE features to probe")
    p.add_argument("--atlas", default=None, help="parcellation for fc / parcel_mlp (default per task)")
    p.add_argument("--hrf-delay", type=float, default=0.0,
                   help="state21: seconds between event onset and clip start (default 0)")


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="probe a frozen MAE checkpoint on a state / trait benchmark")
    p.add_argument("--checkpoint", required=True, help="MAE model.pt or training checkpoint.pt")
    _add_bench_args(p)
    p.set_defaults(func=_run_probe, methods=("mae",))


def _add_baseline(sub) -> None:
    p = sub.add_parser("baseline", help="run a baseline on a state / trait benchmark")
    p.add_argument("name", help="fc | parcel_mlp | depth0 | random_init | chance")
    p.add_argument("--checkpoint", default=None,
                   help="MAE whose architecture depth0 / random_init take (default mae_vit_tiny)")
    _add_bench_args(p)
    p.set_defaults(func=_run_probe, methods=None)


def _run_probe(args) -> int:
    from fmri_bench.harness import benchmark, write_benchmark

    methods = args.methods or (args.name,)
    if args.methods is None and args.name not in ("fc", "parcel_mlp", "depth0", "random_init", "chance"):
        raise InputError(f"unknown baseline {args.name!r}; expected fc, parcel_mlp, depth0, random_init or chance")
    if args.out:  # check where the results go before the compute, not after it
        from pathlib import Path

        for parent in Path(args.out).resolve().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise InputError("cannot write results under a file (a parent of --out is a file)", parent)
                break
        if Path(args.out).is_dir():
            raise InputError("--out is a folder; give a results .json path", args.out)
    config = None
    if args.methods is None and args.checkpoint is not None:
        from fmri_bench.harness import load_encoder

        config = load_encoder(args.checkpoint).config
    bench = benchmark(args.task, args.data, methods=methods, checkpoint=args.checkpoint, seeds=args.seeds,
                      representations=args.representations, atlas=args.atlas, config=config,
                      hrf_delay=args.hrf_delay)
    print(bench.markdown())
    if args.out:
        print(f"-> {write_benchmark(bench, args.out)}")
    return 0


# --- parcellate -------------------------------------------------------------------------------
def _add_parcellate(sub) -> None:
    p = sub.add_parser("parcellate", help="fMRI runs -> parcel time series (.npy per run + parcels.json)")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="dtseries .nii, func.gii or NIfTI volume; or one HCP tree / fMRIPrep folder (its runs)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--atlas", default=None,
                   help="mmp | schaefer400 | yeo7 | yeo17 (fs_LR 32k) | seitzman300 (fsaverage5); "
                        "default: mmp for fs_LR, seitzman300 for fsaverage5")
    p.add_argument("--input-tr", type=float, default=None, help="override the TR read from the header")
    p.set_defaults(func=_run_parcellate)


def _run_parcellate(args) -> int:
    from pathlib import Path

    from fmri_bench.errors import InputError
    from fmri_bench.harness import adapters
    from fmri_bench.parcels import parcellate

    runs = args.runs
    if len(runs) == 1 and Path(runs[0]).is_dir():  # a dataset folder: its runs, as --data finds them
        root = Path(runs[0])
        layout = adapters.detect_layout(root)
        if layout is None:
            raise InputError("no HCP (*_Atlas_MSMAll.dtseries.nii) or fMRIPrep bold runs in this folder", root)
        runs = adapters.hcp_runs(root) if layout == "hcp" else adapters.fmriprep_runs(root)
    print(f"{len(runs)} runs -> {parcellate(runs, args.out, atlas=args.atlas, tr=args.input_tr)}")
    return 0


# --- describe --------------------------------------------------------------------------------
def _add_describe(sub) -> None:
    p = sub.add_parser("describe", help="parcel series -> descriptor corpus (JSONL: numbers, z, text)")
    p.add_argument("parcels", help="a directory written by fmri-bench parcellate")
    p.add_argument("--out", required=True, help="corpus .jsonl")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--train-subjects", nargs="+", metavar="SUBJECT",
                     help="subjects the z-scores are fitted on (never the test subjects)")
    who.add_argument("--split", metavar="SPLIT_JSON", help="the train subjects of a split written by lm split --out")
    p.add_argument("--seed", type=int, default=0, help="template choice seed")
    p.set_defaults(func=_run_describe)


def _run_describe(args) -> int:
    from fmri_bench.descriptors import describe_directory

    train = args.train_subjects
    if args.split is not None:
        from fmri_bench.lm_data import read_split

        train = [s for s, part in read_split(args.split).items() if part == "train"]
    print(describe_directory(args.parcels, args.out, train, seed=args.seed))
    return 0


# --- tokenizer -------------------------------------------------------------------------------
def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train the fMRI-LM neural tokenizer on parcel windows (resumable)")
    p.add_argument("--config", default=None, help="YAML tokenizer config (default: the tiny CPU settings)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys and YAML values: steps=500 llm=none "
                        "model_overrides.patch_len=20 data.windows=w.npy data.corpus=c.jsonl")
    p.add_argument("--run-dir", required=True, help="directory for config, metrics, checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--llm", default=None, help="frozen LLM: a local model path or name (default SmolLM2-135M-Instruct)")
    p.set_defaults(func=_run_tokenizer)


def _run_tokenizer(args) -> int:
    from fmri_bench.tokenizer_train import load_config, train

    overrides = list(args.overrides) + ([f"llm={args.llm}"] if args.llm else [])
    res = train(load_config(args.config, overrides), args.run_dir, resume=args.resume)
    last = [r for r in res["history"] if "loss" in r]
    loss = f"{last[-1]['loss']:.4f}" if last else "n/a"
    print(f"step {res['step']}: train loss {loss}, val {res['val'] or 'n/a'}, "
          f"{res['clips_per_s']:.1f} clips/s -> {args.run_dir}")
    return 0


# --- lm ------------------------------------------------------------------------------------
def _add_lm(sub) -> None:
    p = sub.add_parser("lm", help="fMRI-LM: the LLM that reads fMRI (split / windows: its inputs; stage 2: align, stage 3: "
                                    "instruct; evaluate: answers on the test subjects)")
    lm_sub = p.add_subparsers(dest="lm_command", required=True)
    a = lm_sub.add_parser("align", help="stage 2: train the LLM (LoRA) on F2F / F2T / T2T (resumable)")
    a.add_argument("--config", default=None, help="YAML fMRI-LM config (default: the tiny CPU settings)")
    a.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys and YAML values: steps=200 tokenizer=runs/tok/tokenizer.pt "
                        "model_overrides.finetune=full data.windows=w.npy data.corpus=c.jsonl")
    a.add_argument("--run-dir", required=True, help="directory for config, metrics, checkpoints")
    a.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    a.add_argument("--llm", default=None, help="LLM: a local model path or name (default SmolLM2-135M-Instruct)")
    a.set_defaults(func=_run_lm_align)
    i = lm_sub.add_parser("instruct", help="stage 3: instruction-tune a stage-2 model on questions about scans")
    i.add_argument("--config", default=None, help="YAML instruct config (configs/instruct_tiny_cpu.yaml); flags win")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides: steps=100 questions=[sex,state]")
    i.add_argument("--checkpoint", default=None, help="fmri_lm.pt written by lm align")
    i.add_argument("--windows", default=None, help=".npy parcel windows (n, frames, parcels) in the tokenizer's shape")
    i.add_argument("--labels", default=None,
                   help="JSONL, one record per window: subject, text (descriptors), sex / state / fluid_tertile")
    i.add_argument("--questions", nargs="+", default=None, help="question types: sex, fluid, state, paradigm, age_bin, age (default sex)")
    i.add_argument("--run-dir", required=True, help="directory for the checkpoint and fmri_lm.pt")
    i.add_argument("--steps", type=int, default=None, help="default 50")
    i.add_argument("--batch-size", type=int, default=None, help="default 4")
    i.add_argument("--lr", type=float, default=None, help="default 2e-4")
    i.add_argument("--seed", type=int, default=None, help="default 0")
    i.add_argument("--no-descriptors", action="store_true", help="leave the descriptor text out of the prompts")
    i.add_argument("--fit-descriptors", action="store_true",
                   help="cut descriptor texts at sentence ends to fit the prompt budget (default: refuse)")
    i.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    i.add_argument("--llm", default=None, help="where the checkpoint's LLM is now (default: as trained)")
    i.set_defaults(func=_run_lm_instruct)
    e = lm_sub.add_parser("evaluate", help="answers about the test subjects' scans -> balanced accuracy + CI beside "
                                           "chance, majority, a linear probe and FC (a results table)")
    e.add_argument("--checkpoint", required=True, help="fmri_lm.pt written by lm instruct (or lm align)")
    e.add_argument("--data", required=True, help="the folder lm windows wrote (test/: answered; fit/: the yardsticks)")
    e.add_argument("--out", required=True, help="results table .json (a .md is written beside it)")
    e.add_argument("--questions", nargs="+", default=None,
                   help="question types (default: every one whose label the data carry)")
    e.add_argument("--no-descriptors", action="store_true", help="leave the descriptor text out of the prompts")
    e.add_argument("--fit-descriptors", action="store_true",
                   help="cut descriptor texts at sentence ends to fit the prompt budget (default: refuse)")
    e.add_argument("--llm", default=None, help="where the checkpoint's LLM is now (default: as trained)")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws over test subjects (default 1000)")
    e.add_argument("--seed", type=int, default=0, help="paraphrases, bootstrap and the FC subsample (default 0)")
    e.add_argument("--batch-size", type=int, default=8, help="windows answered at a time (default 8)")
    e.set_defaults(func=_run_lm_evaluate)
    sp = lm_sub.add_parser("split", help="the subject split of a parcellate directory (prints the training subjects)")
    sp.add_argument("parcels", help="a directory written by fmri-bench parcellate")
    sp.add_argument("--labels-from", default=None, help="HCP tree, fMRIPrep folder or participants.tsv (families)")
    sp.add_argument("--seed", type=int, default=0, help="split seed (default 0, the benchmarks' first re-split)")
    sp.add_argument("--out", default=None, help="also write the split as JSON (for describe --split)")
    sp.set_defaults(func=_run_lm_split)
    w = lm_sub.add_parser("windows", help="parcel runs + descriptor corpus -> windows, per-window corpus and labels")
    w.add_argument("parcels", help="a directory written by fmri-bench parcellate")
    w.add_argument("--corpus", required=True, help="corpus .jsonl written by fmri-bench describe")
    w.add_argument("--labels-from", default=None, help="HCP tree, fMRIPrep folder or participants.tsv (the labels)")
    w.add_argument("--out", required=True, help="output directory (windows.npy, corpus.jsonl, labels.jsonl; fit/, test/)")
    w.add_argument("--seed", type=int, default=0, help="split seed (default 0; the one lm split printed)")
    w.add_argument("--length", type=int, default=160, help="window length in frames at --tr (default 160)")
    w.add_argument("--tr", type=float, default=2.0, help="model TR in seconds (default 2.0)")
    w.add_argument("--short", choices=["pad", "skip"], default="pad", help="a run shorter than one window")
    w.add_argument("--networks", action="store_true", help="Yeo-7 network x hemisphere regions instead of parcels")
    w.set_defaults(func=_run_lm_windows)


def _run_lm_align(args) -> int:
    import os

    from fmri_bench.lm_train import load_config, train

    overrides = list(args.overrides) + ([f"llm={args.llm}"] if args.llm else [])
    res = train(load_config(args.config, overrides), args.run_dir, resume=args.resume)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 reports
        return 0
    last = [r for r in res["history"] if "loss" in r]
    loss = f"{last[-1]['loss']:.4f}" if last else "n/a"
    val = {k: round(v, 4) for k, v in res["val"].items()} or "n/a"
    print(f"step {res['step']}: train loss {loss}, val {val}, {res['seqs_per_s']:.2f} seqs/s -> {args.run_dir}")
    return 0


def _run_lm_evaluate(args) -> int:
    from fmri_bench.lm_evaluate import lm_evaluate

    res = lm_evaluate(args.checkpoint, args.data, args.out, args.questions, descriptors=not args.no_descriptors,
                      fit_descriptors=args.fit_descriptors, llm=args.llm, n_boot=args.n_boot, seed=args.seed,
                      batch_size=args.batch_size)
    print("\n".join(res["verdicts"]))
    print(f"-> {res['json']} ({len(res['rows'])} rows)")
    return 0


def _run_lm_split(args) -> int:
    from fmri_bench.lm_data import parcel_split

    parts = parcel_split(args.parcels, args.labels_from, seed=args.seed)
    if args.out is not None:
        from fmri_bench.lm_data import write_split

        write_split(parts, args.out, args.seed)
    for name in ("train", "val", "test"):
        print(f"{name}: {' '.join(s for s, p in sorted(parts.items()) if p == name)}")
    return 0


def _run_lm_windows(args) -> int:
    from fmri_bench.lm_data import lm_windows

    print(lm_windows(args.parcels, args.corpus, args.out, args.labels_from, seed=args.seed, length=args.length,
                     tr=args.tr, short=args.short, networks=args.networks))
    return 0


def _run_lm_instruct(args) -> int:
    import os

    from fmri_bench.lm_instruct import instruct, load_instruct_config

    c = load_instruct_config(args.config, args.overrides, checkpoint=args.checkpoint, windows=args.windows,
                             labels=args.labels, questions=args.questions, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed, llm=args.llm,
                             descriptors=False if args.no_descriptors else None,
                             fit_descriptors=True if args.fit_descriptors else None)
    res = instruct(c.checkpoint, c.windows, c.labels, c.questions, args.run_dir, steps=c.steps,
                   batch_size=c.batch_size, lr=c.lr, seed=c.seed, descriptors=c.descriptors,
                   fit_descriptors=c.fit_descriptors, resume=args.resume, llm=c.llm, device=c.device)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun rank 0 reports
        print(f"step {res['step']}: answer loss {res['loss']:.4f} on {res['examples']} examples -> "
              f"{res['run_dir']}/fmri_lm.pt")
    return 0


# --- ask -------------------------------------------------------------------------------------
def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="ask a trained fMRI-LM a question about a scan (constrained answer)")
    p.add_argument("question", help='the question, e.g. "Is this subject male or female?"')
    p.add_argument("--checkpoint", required=True, help="fmri_lm.pt (or checkpoint.pt) written by lm align")
    p.add_argument("--scan", required=True, help="the scan: a run (CIFTI / GIFTI / NIfTI), parcellated here, or .npy "
                                                  "parcel windows (n, frames, parcels)")
    p.add_argument("--atlas", default="mmp", help="atlas for a run file (default mmp; must be the model's)")
    p.add_argument("--networks", action="store_true",
                   help="summarise a run to Yeo-7 network x hemisphere regions (chapters 07-08's 14 regions)")
    p.add_argument("--tr", type=float, default=None, help="repetition time of a run file (default: its header)")
    p.add_argument("--options", nargs="+", required=True, help="the allowed answers, e.g. Male Female")
    p.add_argument("--descriptors", default="", help="descriptor text of the scan for the prompt")
    p.add_argument("--llm", default=None, help="where the checkpoint's LLM is now (default: as trained)")
    p.set_defaults(func=_run_ask)


def _run_ask(args) -> int:
    from fmri_bench.lm_train import ask

    res = ask(args.checkpoint, args.scan, args.question, args.options, descriptors=args.descriptors, llm=args.llm,
              atlas=args.atlas, networks=args.networks, tr=args.tr)
    print(f"answer: {res['answer']}  ({res['windows']} windows)")
    for o, p in res["probabilities"].items():
        print(f"  {o}: {p:.3f}")
    return 0


# --- reproduce -------------------------------------------------------------------------------
def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="make every results table (or some) with its provenance")
    p.add_argument("--profile", default="book", choices=["smoke", "book", "paper"],
                   help="smoke: CI sizes; book: the chapters' sizes on a CPU (default); paper: the papers' sizes on GPUs")
    p.add_argument("--only", nargs="+", default=None, metavar="TABLE",
                   help="tables (ch04_state_decoding) or chapters (04) to make; default all")
    p.add_argument("--data", default=None, help="dataset name or path (paper: shards with train/ and val/)")
    p.add_argument("--out", default=None, help="output folder (default book/: results/, notebooks/, provenance.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated compute, run nothing")
    p.add_argument("--force", action="store_true", help="paper profile: run even without a GPU")
    p.add_argument("--gpus", type=int, default=1, help="paper profile: GPUs for torchrun (default 1)")
    p.add_argument("--lm-data", default=None,
                   help="paper profile: raw runs (HCP tree / fMRIPrep folder) for the fMRI-LM steps")
    p.set_defaults(func=_run_reproduce)


def _run_reproduce(args) -> int:
    from fmri_bench.book import NotebookError
    from fmri_bench.reproduce import reproduce

    try:
        rec = reproduce(args.profile, args.only, args.out, args.data, dry_run=args.dry_run, force=args.force,
                        gpus=args.gpus, lm_data=args.lm_data)
    except NotebookError as err:
        print(f"fmri-bench reproduce: {err}", file=sys.stderr)
        return 1
    if not args.dry_run:
        tables = [t for c in rec["chapters"] for t in c["tables"]]
        print(f"tables={len(tables)} seconds={rec['seconds']} commit={rec['commit']}")
    return 0


# --- data ------------------------------------------------------------------------------------
def _add_data(sub) -> None:
    p = sub.add_parser("data", help="the dataset catalogue (data/datasets.yaml): what is present here")
    dsub = p.add_subparsers(dest="data_command", required=True)
    ls = dsub.add_parser("list", help="every catalogued dataset: present or not, size, what uses it")
    ls.add_argument("--json", action="store_true", help="machine-readable rows instead of the table")
    ls.set_defaults(func=_run_data_list)


def _run_data_list(args) -> int:
    import json

    from fmri_bench.catalog import format_listing, listing

    rows = listing()
    print(json.dumps(rows, indent=1) if args.json else format_listing(rows))
    return 0


# --- entry point -----------------------------------------------------------------------------
_COMMANDS = [_add_flatten, _add_book, _add_pretrain, _add_simulate, _add_probe, _add_baseline, _add_parcellate,
             _add_describe, _add_tokenizer, _add_lm, _add_ask, _add_data, _add_reproduce]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmri-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def one_line(err: BaseException) -> str:
    """An error's message on one line. One re-raised from a DataLoader worker carries the worker's
    traceback ("Caught InputError in DataLoader worker process 0. Original Traceback ..."): the
    worker's own message (the traceback's last line) takes the place of that text."""
    import re

    text = str(err)
    head, caught, rest = text.partition("Caught ")
    if caught and "\nOriginal Traceback" in rest:
        last = rest.strip().splitlines()[-1]
        text = head + re.sub(r"^[\w.]+: ", "", last, count=1)  # drop "fmri_bench.errors.InputError: "
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"fmri-bench {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmri-bench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
