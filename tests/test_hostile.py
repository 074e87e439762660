"""Hostile inputs: one row per bad input or fault.

Each row: a builder that makes the input in ``tmp_path`` and returns the argv for
``fmri_bench.cli.main``, the expected exit code, a fragment the one-line message must hold, and
glob patterns that must match nothing afterwards (files a run must not leave behind).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from fmri_bench import convert
from fmri_bench.cli import main
from fmri_bench.io import FSLR_N_CORTEX, write_cifti
from fmri_bench.models.mae import MaskedAutoencoderViT, preset_config, save_checkpoint

TINY = dict(img_size=(16, 32), patch_size=8, num_frames=4, t_patch_size=2, embed_dim=16, depth=1,
            num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    x = (np.random.default_rng(1).standard_normal((8, FSLR_N_CORTEX)) * 3 + 10).astype(np.float32)
    return write_cifti(tmp_path_factory.mktemp("cifti") / "run8.dtseries.nii", x, tr=1.0)


# --- input builders: (tmp_path, run8) -> argv -------------------------------------------

def _ckpt(tmp, data: bytes) -> str:
    p = tmp / "ckpt.pt"
    p.write_bytes(data)
    return str(p)


def _probe(path) -> list[str]:
    return ["baseline", "depth0", "--checkpoint", str(path), "--task", "state21", "--seeds", "1"]


def _truncated_ckpt(tmp, run8):
    buf = io.BytesIO()
    torch.save({"format": "x", "w": torch.zeros(100)}, buf)
    return _probe(_ckpt(tmp, buf.getvalue()[:200]))


def _random_ckpt(tmp, run8):
    return _probe(_ckpt(tmp, np.random.default_rng(0).bytes(4096)))


def _pickled_object_ckpt(tmp, run8):  # a non-tensor pickle: torch's error recommends weights_only=False
    buf = io.BytesIO()
    torch.save({"obj": Path("x")}, buf)
    return _probe(_ckpt(tmp, buf.getvalue()))


def _folder_ckpt(tmp, run8):
    (tmp / "run").mkdir()
    return _probe(tmp / "run")


def _flatten(*extra):
    def build(tmp, run8):
        return ["flatten", str(run8), "--out", str(tmp / "out"), *extra]
    return build


def _out_under_file(tmp, run8):
    (tmp / "afile").write_text("x")
    return ["baseline", "chance", "--task", "state21", "--data", str(tmp / "nodata"),
            "--out", str(tmp / "afile" / "r.json")]


def _twice(tmp, run8):
    return ["flatten", str(run8), str(run8), "--out", str(tmp / "out")]


def _overwrite_with_nothing_new(tmp, run8):
    assert main(["flatten", str(run8), "--out", str(tmp / "out")]) == 0
    return ["flatten", str(tmp / "mistyped.dtseries.nii"), "--out", str(tmp / "out"), "--overwrite"]


def _pretrain(*overrides, config: str | None = None):
    def build(tmp, run8):
        argv = ["pretrain", "--run-dir", str(tmp / "run"), "data.synthetic=true", *overrides]
        if config is not None:
            (tmp / "cfg.yaml").write_text(config)
            argv += ["--config", str(tmp / "cfg.yaml")]
        return argv
    return build


def _resume_from(kind: str):
    """pretrain --resume over a run directory whose checkpoint.pt is truncated, random bytes, or
    a torch file that fmri_bench did not write."""
    def build(tmp, run8):
        run = tmp / "run"
        run.mkdir()
        buf = io.BytesIO()
        torch.save({"format": "x", "w": torch.zeros(100)} if kind == "truncated" else {"weights": torch.zeros(3)}, buf)
        blob = {"truncated": buf.getvalue()[:200], "random": np.random.default_rng(0).bytes(4096),
                "foreign": buf.getvalue()}[kind]
        (run / "checkpoint.pt").write_bytes(blob)
        return ["pretrain", "--run-dir", str(run), "data.synthetic=true", "steps=1", "--resume"]
    return build


def _run_dir_is_a_file(tmp, run8):
    (tmp / "run").write_text("x")
    return ["pretrain", "--run-dir", str(tmp / "run"), "data.synthetic=true", "steps=1"]


def _good_shard(folder: Path) -> Path:
    """One shard of three 200-frame runs on a 20 x 50 grid (~1.2 MB): data a cut can land in."""
    from fmri_bench.shards import ShardWriter

    with ShardWriter(folder, shard_size=8) as sink:
        for i in range(3):
            sink.write(f"sub-0{i}_task-rest_bold", np.zeros((200, 1000), np.float16), np.ones((20, 50), bool),
                       {"tr": 1.0, "entities": {"sub": f"0{i}", "task": "rest"}})
    return folder / "shard-000000.tar"


def _truncated_shard(folder: Path) -> Path:
    path = _good_shard(folder)
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * 0.6)])  # the second run's bold.npy is cut
    return path


def _garbage_shard(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shard-000000.tar"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return path


def _corrupt_member_shard(folder: Path) -> Path:
    """A readable tar whose first run's bold.npy is not an array."""
    import tarfile

    path = _good_shard(folder)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == "sub-00_task-rest_bold.bold.npy":
                data = b"\x93NUMPY garbage" + bytes(100)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return path


def _pretrain_on(make_shard, *overrides):
    def build(tmp, run8):
        make_shard(tmp / "shards")
        return ["pretrain", "--run-dir", str(tmp / "run"), f"data.train_urls=[{tmp / 'shards'}]", "steps=1",
                "batch_size=2", "progress=false", "figures=false", *overrides]
    return build


def _resume_over(make_shard):
    def build(tmp, run8):
        make_shard(tmp / "out")
        return ["flatten", str(run8), "--out", str(tmp / "out"), "--resume"]
    return build


def _bench_on(make_shard):
    def build(tmp, run8):
        make_shard(tmp / "shards")
        return ["baseline", "chance", "--task", "state21", "--data", str(tmp / "shards"), "--seeds", "1"]
    return build


def _cifti(kind: str):
    """A tiny CIFTI-2 file of another kind than flatten reads: 5 fs_LR left-cortex vertices."""
    def build(tmp, run8):
        import nibabel as nib
        from nibabel.cifti2 import cifti2_axes as ax

        mask = np.zeros(32492, bool)
        mask[:5] = True
        dense = ax.BrainModelAxis.from_mask(mask, name="CortexLeft")
        parcels = ax.ParcelsAxis.from_brain_models([("p1", dense)])
        series = ax.SeriesAxis(0.0, 1.0, 4)
        axes, shape, name = {
            "dconn": ((dense, dense), (5, 5), "x.dconn.nii"),
            "dlabel": ((ax.LabelAxis(["l"], {0: ("?", (0, 0, 0, 0)), 1: ("a", (1, 0, 0, 1))}), dense), (1, 5),
                       "x.dlabel.nii"),
            "ptseries": ((series, parcels), (4, 1), "x.ptseries.nii"),
        }[kind]
        path = tmp / name
        nib.Cifti2Image(np.ones(shape, np.float32), header=axes).to_filename(path)
        return ["flatten", str(path), "--out", str(tmp / "out")]
    return build


@dataclass
class Case:
    name: str
    build: Callable
    code: int
    fragment: str
    left_behind: tuple = ()


CASES = [
    Case("truncated checkpoint", _truncated_ckpt, 2, "cannot read as a torch checkpoint"),
    Case("random-bytes checkpoint", _random_ckpt, 2, "cannot read as a torch checkpoint"),
    Case("pickled-object checkpoint", _pickled_object_ckpt, 2, "not written by fmri_bench"),
    Case("folder as checkpoint", _folder_ckpt, 2, "is a folder"),
    Case("--tr in ms", _flatten("--tr", "1000"), 2, "milliseconds", ("out/*.tar",)),
    Case("--tr inf", _flatten("--tr", "inf"), 2, "--tr must be", ("out/*.tar",)),
    Case("--input-tr inf", _flatten("--input-tr", "inf"), 2, "--input-tr must be", ("out/*.tar",)),
    Case("--input-tr 0.002", _flatten("--input-tr", "0.002"), 2, "--input-tr must be", ("out/*.tar",)),
    Case("probe --out under a file", _out_under_file, 2, "under a file"),
    Case("--overwrite, nothing new written", _overwrite_with_nothing_new, 2, "mistyped"),
    Case("same input twice", _twice, 2, "given twice", ("out/*.tar",)),
    Case("steps: ten", _pretrain(config="steps: ten\n"), 2, "steps must be a whole number", ("run/*",)),
    Case("base_lr: fast", _pretrain('base_lr="fast"'), 2, "base_lr must be a number", ("run/*",)),
    Case("YAML syntax error", _pretrain(config="steps: [1,\n"), 2, "not valid YAML at line", ("run/*",)),
    Case("data: [1, 2] in the file", _pretrain(config="data: [1, 2]\n"), 2, "cfg.yaml: 'data' is [1, 2], not a section",
         ("run/*",)),
    Case("batch_size 4.5", _pretrain("batch_size=4.5"), 2, "batch_size must be a whole number", ("run/*",)),
    Case("depth -1", _pretrain("model_overrides.depth=-1"), 2, "depth must be >= 0", ("run/*",)),
    Case("warmup_steps -10", _pretrain("warmup_steps=-10"), 2, "warmup_steps must be >= 0", ("run/*",)),
    Case("--run-dir is a file", _run_dir_is_a_file, 2, "is a file, not a directory"),
    Case("pretrain --resume: truncated checkpoint", _resume_from("truncated"), 2, "checkpoint.pt: cannot read"),
    Case("pretrain --resume: random-bytes checkpoint", _resume_from("random"), 2, "checkpoint.pt: cannot read"),
    Case("pretrain --resume: foreign checkpoint", _resume_from("foreign"), 2,
         "checkpoint.pt: not a training checkpoint written by pretrain"),
    # a run that fails before its first checkpoint may leave config.yaml (a corrected retry is not
    # blocked: test_a_failed_pretrain_does_not_block_a_corrected_retry), never a model or a temp file
    Case("pretrain: truncated shard", _pretrain_on(_truncated_shard), 2,
         "shard-000000.tar: cannot read shard: truncated", ("run/*.pt", "run/.tmp-*")),
    Case("pretrain: garbage shard", _pretrain_on(_garbage_shard), 2, "shard-000000.tar: cannot read shard: not a tar file",
         ("run/*.pt", "run/.tmp-*")),
    Case("pretrain: garbage shard, a loader worker", _pretrain_on(_garbage_shard, "num_workers=1"), 2,
         "shard-000000.tar: cannot read shard: not a tar file", ("run/*.pt", "run/.tmp-*")),
    Case("pretrain: corrupt bold.npy", _pretrain_on(_corrupt_member_shard), 2,
         "shard-000000.tar: sample sub-00_task-rest_bold: bold.npy is not a readable .npy array",
         ("run/*.pt", "run/.tmp-*")),
    Case("flatten --resume: garbage shard", _resume_over(_garbage_shard), 2,
         "shard-000000.tar: cannot read shard: not a tar file"),
    Case("baseline: garbage shard", _bench_on(_garbage_shard), 2, "shard-000000.tar: cannot read shard: not a tar file"),
    Case("dconn CIFTI", _cifti("dconn"), 2,
         "a dense connectome (dconn) is not a time series; flatten reads dtseries", ("out/*.tar",)),
    Case("dlabel CIFTI", _cifti("dlabel"), 2, "a label file (dlabel) holds parcel labels", ("out/*.tar",)),
    Case("ptseries CIFTI", _cifti("ptseries"), 2, "parcellated (ptseries", ("out/*.tar",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case, tmp_path, run8, capsys, monkeypatch):
    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path / "data"))
    argv = case.build(tmp_path, run8)
    capsys.readouterr()
    assert main(argv) == case.code
    err = capsys.readouterr().err.strip()
    assert case.fragment in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if "run/s]" not in ln and ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err  # progress-bar lines aside
    assert "weights_only=False" not in err
    for pattern in case.left_behind:
        assert not list(tmp_path.glob(pattern)), pattern
    if case.name.startswith("--overwrite"):  # the earlier shard survives
        assert (tmp_path / "out" / "shard-000000.tar").is_file()


def test_gifti_timestep_in_seconds_is_refused(tmp_path, rng):
    """A header TR of 0.002 s (GIFTI TimeStep 2 read as ms) would collapse the run to one frame."""
    from fmri_bench.io import load_run

    mapper_space = "fs_LR_32k"
    x = rng.standard_normal((8, FSLR_N_CORTEX)).astype(np.float32)
    path = write_cifti(tmp_path / "run.dtseries.nii", x, tr=0.002)
    assert load_run(path).tr == pytest.approx(0.002)
    with pytest.raises(convert.InputError, match="implausible"):
        convert.convert_run(path, "run", space=mapper_space)


# --- checkpoint saves -------------------------------------------------------------------

def test_checkpoint_bytes_reproducible_for_same_seed(tmp_path):
    for name in ("a", "b"):
        torch.manual_seed(0)
        MaskedAutoencoderViT(preset_config("mae_vit_tiny", **TINY)).save_pretrained(tmp_path / name / "model.pt")
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    # across processes too: torch names the zip records after the file it writes, so a
    # per-process temp name inside the archive would change the bytes from run to run
    import zipfile

    names = zipfile.ZipFile(tmp_path / "a" / "model.pt").namelist()
    assert names and not any(".tmp-" in n or str(os.getpid()) in n for n in names), names


def test_save_cleans_temp_files_of_a_killed_save(tmp_path):
    stale = tmp_path / ".tmp-12345-678-checkpoint.pt"
    stale.write_bytes(b"half")
    save_checkpoint(tmp_path / "checkpoint.pt", {"x": torch.zeros(2)})
    assert not stale.exists() and (tmp_path / "checkpoint.pt").is_file()


# --- what a killed run leaves behind is cleaned by the next run of the same command --------

DEAD_PID = 2 ** 22 + 12345  # above the default pid_max: no such process


def test_simulate_removes_a_killed_runs_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FMRI_BENCH_DATA", str(tmp_path / "data"))
    stale = tmp_path / f".cohort.partial-{DEAD_PID}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x.npy").write_bytes(b"0" * 100)
    live = tmp_path / f".cohort.partial-{os.getppid()}"  # a running process: kept
    live.mkdir()
    from fmri_bench.paths import remove_dead_work

    removed = remove_dead_work(tmp_path, r"\.cohort\.partial-(?P<pid>\d+)")
    assert removed == [stale] and not stale.exists() and live.exists()


def test_flatten_removes_a_killed_runs_temp_files(tmp_path, run8, monkeypatch):
    out = tmp_path / "out"
    (out / f".flatten-{DEAD_PID}-abc").mkdir(parents=True)
    (out / f".flatten-{DEAD_PID}-abc" / "tmp1.npy").write_bytes(b"0" * 100)
    (out / "shard-000000.tar.tmp").write_bytes(b"half")
    (out / "shard-000001.tar.tmp").write_bytes(b"other job's")  # job 1 of 2: not ours
    monkeypatch.setitem(convert._MAPPERS, "fs_LR_32k", _ToyMapper())
    summary = convert.flatten([run8], out, progress=False, num_shards=2, shard_index=0)
    assert summary.runs == 1
    assert not list(out.glob(".flatten-*")) and not (out / "shard-000000.tar.tmp").exists()
    assert (out / "shard-000001.tar.tmp").exists()


class _ToyMapper:
    space, n_vertices = "fs_LR_32k", FSLR_N_CORTEX

    def __init__(self):
        self.mask = np.ones((2, 3), bool)
        self.n_pixels = 6
        self.verts = np.arange(6)

    def to_pixels(self, x):
        return np.atleast_2d(np.asarray(x, np.float32))[:, self.verts]

    def grid_meta(self):
        return {"space": self.space, "shape": [2, 3], "bbox": [0.0, 3.0, 0.0, 2.0],
                "pixel_size": 1.0, "max_edge_mm": 16.0}


def test_a_failed_pretrain_does_not_block_a_corrected_retry(tmp_path, capsys):
    """A run that fails before its first checkpoint leaves no config that a corrected retry is
    refused against."""
    run = tmp_path / "run"
    assert main(["pretrain", "--run-dir", str(run), f"data.train_urls=[{tmp_path / 'none'}]", "steps=1"]) == 2
    assert main(["pretrain", "--run-dir", str(run), "data.synthetic=true", "steps=1", "batch_size=2",
                 "progress=false", "figures=false", "data.val_batches=1"]) == 0
    assert (run / "model.pt").is_file()


# --- permissions and a full disk ------------------------------------------------------------
# Root passes every permission check, and no small filesystem is at hand: these run the command
# in a child process in a Linux user namespace (``unshare``). Without CAP_DAC_OVERRIDE over the
# files here (user namespace, no uid mapping) a mode-0555 folder is not writable even for root;
# with a mount namespace besides (``unshare -Urm``) the child mounts a 16 KiB tmpfs as --out.
# Where namespaces are not allowed the tests are skipped with the reason.

TOY_CLI = """
import sys
import numpy as np
from fmri_bench import convert
from fmri_bench.cli import main

class Toy:  # 4000 pixels: an 8-frame run is a 64 KiB bold.npy
    space, n_vertices = "fs_LR_32k", 59412
    mask = np.ones((40, 100), bool)
    n_pixels = 4000
    def to_pixels(self, x):
        return np.atleast_2d(np.asarray(x, np.float32))[:, :4000]
    def grid_meta(self):
        return {"space": self.space, "shape": [40, 100], "bbox": [0.0, 100.0, 0.0, 40.0],
                "pixel_size": 1.0, "max_edge_mm": 16.0}

convert._MAPPERS["fs_LR_32k"] = Toy()
sys.exit(main(sys.argv[1:]))
"""


def _namespace(prefix: list[str], probe: str, why: str) -> None:
    """Skip (saying ``why`` the namespace was needed) unless ``prefix sh -c probe`` exits 0 here."""
    import shutil
    import subprocess

    if shutil.which(prefix[0]) is None:
        pytest.skip(f"{prefix[0]} is not installed, and {why}")
    res = subprocess.run([*prefix, "sh", "-c", probe], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        said = " ".join(res.stderr.split()) or f"exit {res.returncode}"
        pytest.skip(f"`{' '.join(prefix)}` fails here ({said}): user or mount namespaces are not allowed "
                    f"(kernel.unprivileged_userns_clone, user.max_user_namespaces, a seccomp profile), and {why}")


def _toy_cli(prefix: list[str], args: list, before: str = "", after: str = "") -> tuple[int, str, str]:
    """Run ``fmri-bench args`` (toy flat map) in a shell under ``prefix``, between the shell
    commands ``before`` and ``after`` -> (exit code of the CLI, stderr less progress bars, stdout)."""
    import subprocess
    import sys

    shell = f'p="$1"; s="$2"; shift 2; {before} "$p" -c "$s" "$@"; rc=$?; {after} exit $rc'
    res = subprocess.run([*prefix, "sh", "-c", shell, "sh", sys.executable, TOY_CLI, *map(str, args)],
                         capture_output=True, text=True, timeout=300)
    err = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip() and "run/s]" not in ln]
    return res.returncode, "\n".join(err), res.stdout


def _unprivileged(tmp_path) -> list[str]:
    """A command prefix under which file modes bind: none for a non-root user, else a user namespace."""
    if os.geteuid() != 0:
        return []
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    _namespace(["unshare", "-U"], f"! touch {probe}/x 2>/dev/null",
               "root writes and reads regardless of file modes outside a user namespace")
    return ["unshare", "-U"]


def test_output_folder_not_writable(tmp_path, run8):
    prefix = _unprivileged(tmp_path)
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    out.chmod(0o555)
    code, err, _ = _toy_cli(prefix, ["flatten", run8, "--out", out])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{out}: output directory is not writable (Permission denied)" in err
    assert list(out.iterdir()) == []


def test_input_not_readable(tmp_path, run8):
    prefix = _unprivileged(tmp_path)
    locked = tmp_path / "sub-01_bold.dtseries.nii"
    locked.write_bytes(Path(run8).read_bytes())
    locked.chmod(0)
    code, err, _ = _toy_cli(prefix, ["flatten", locked, "--out", tmp_path / "out"])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{locked}: " in err and "Permission denied" in err
    assert not list((tmp_path / "out").glob("*.tar*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_while_writing_a_shard(tmp_path, run8, workers):
    """workers 1: the shard's own write fails; 2: a worker's spill file (the run's frames, handed
    to the writing process through a file in --out) fails first."""
    out = tmp_path / "out"
    out.mkdir()
    second = tmp_path / "sub-02_bold.dtseries.nii"
    second.write_bytes(Path(run8).read_bytes())
    _namespace(["unshare", "-Urm"], f"mount -t tmpfs -o size=16k tmpfs {out}",
               "no small filesystem can be mounted as --out without a mount namespace")
    # in the namespace: --out is a 16 KiB tmpfs; after the command, list what it left there
    code, err, listing = _toy_cli(["unshare", "-Urm"], ["flatten", run8, second, "--out", out, "--workers", workers],
                                  before=f"mount -t tmpfs -o size=16k tmpfs {out} || exit 97;", after=f"ls -A {out};")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    where = f"{out}/shard-000000.tar: cannot write the shard" if workers == 1 else f"{out}: cannot write"
    assert f"{where} (No space left on device)" in err, err
    assert listing.strip() == "", listing  # no partial shard, no temp file
