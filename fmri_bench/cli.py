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
    p.set_defaults(func=_run_flatten)


def _run_flatten(args) -> int:
    from fmri_bench.convert import flatten

    summary = flatten(
        args.inputs, args.out, space=args.space, tr=args.tr, input_tr=args.input_tr,
        events=args.events, shard_size=args.shard_size, workers=args.workers,
        shard_index=args.shard_index, num_shards=args.num_shards, progress=True,
    )
    print(summary.line())
    return 0 if not summary.failed else 2


# --- entry point -----------------------------------------------------------------------------
_COMMANDS = [_add_flatten]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmri-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"fmri-bench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmri-bench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
