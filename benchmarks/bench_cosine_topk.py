"""Cosine top-k: streaming (Triton on CUDA, chunked torch on CPU) vs the full score matrix.

    python benchmarks/bench_cosine_topk.py                 # CPU: 1k x {10k, 100k} x 512
    python benchmarks/bench_cosine_topk.py --sizes 1000000 # the 1M gallery (full matrix skipped: 4 GB)

Prints time and peak extra memory for each path. On the CPU, peak memory is the growth of
the process's maximum resident set, so the bounded path runs first; on CUDA it is
torch.cuda.max_memory_allocated. The GPU figures need a CUDA machine.
"""
import argparse
import os
import sys
import resource
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-full-mb", type=float, default=2048, help="skip the full-matrix path above this")
    args = p.parse_args()
    import kernels
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; {args.queries} queries, dim {args.dim}, k {args.k}")
    if not cuda:
        print("no CUDA: comparing the chunked torch path with the full matrix; the Triton kernel's figures need a GPU")
    paths = {"streaming": lambda q, g: kernels.cosine_topk(q, g, args.k),
             "full matrix": lambda q, g: kernels.cosine_topk_reference(q, g, args.k)}
    print(f"{'gallery':>9} {'path':<12} {'seconds':>9} {'peak extra MB':>14} {'full matrix MB':>15}")
    for n in args.sizes:
        q = torch.randn(args.queries, args.dim, device=device, dtype=dtype)
        g = torch.randn(n, args.dim, device=device, dtype=dtype)
        results = {}
        for name, fn in paths.items():
            full_mb = args.queries * n * 4 / 2**20
            if name == "full matrix" and full_mb > args.max_full_mb:
                print(f"{n:>9} {name:<12} skipped: its score matrix alone is {full_mb:.0f} MB (--max-full-mb)")
                continue
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = peak_rss_mb()
            t0 = time.perf_counter()
            results[name] = fn(q, g)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss_mb() - base
            print(f"{n:>9} {name:<12} {seconds:9.3f} {extra:14.0f} {args.queries * n * 4 / 2**20:15.0f}")
        if len(results) == 2:
            print(f"{'':>9} same indices: {torch.equal(results['streaming'][1], results['full matrix'][1])}")


if __name__ == "__main__":
    main()
