"""Peak memory of training on a large .npy pair (the files are memory-mapped, never read whole), and of
retrieval metrics as the query count grows (memory bounded by chunks, not by Q or G).

    python benchmarks/bench_memmap.py                      # 1,000,000 x 512 float32 pair (2 x 2 GB)
    python benchmarks/bench_memmap.py --rows 100000 --keep # smaller; keep the files for reuse
    python benchmarks/bench_memmap.py --metrics 10000 100000 1000000 --dim 64   # queries against 100,000 items

Writes two random (N, D) float32 .npy files (un-normalised, as raw exports are), then in a fresh
process: loads them with embed_cache (checks every row in chunks, pairs, hash-splits), fits the
embedding statistics, and runs --steps training steps of the default model. Prints the wall
time of each stage and the process's peak resident memory (VmHWM), with the file-backed
part (mapped pages of the .npy files, which the kernel can drop) and the anonymous part
(what the process itself allocated) at the end, next to the size of the data.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from embed_cache.base import atomic_write  # noqa: E402


def write(path: str, rows: int, dim: int, seed: int) -> None:
    """A .npy file written in chunks (the writer never holds the array), atomically."""
    rng = np.random.default_rng(seed)

    def chunks(f):
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        for start in range(0, rows, 65536):
            f.write((rng.standard_normal((min(rows, start + 65536) - start, dim), dtype=np.float32) * 3).tobytes())
    atomic_write(path, chunks)


def peak() -> float:   # VmHWM: this process's peak RSS in MB (ru_maxrss would include the parent's, over fork)
    return float(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) / 1024


def metrics_child(queries: int, dim: int, gallery: int = 100_000) -> None:
    """R@k, medR, mAP@10 and the R@1 bootstrap interval as score_retrieval computes them, Q queries near their
    gallery item; the peak RSS beyond the inputs (the queries alone are Q x dim x 4 bytes)."""
    import torch
    import diffgap_eval as ev
    g = torch.Generator().manual_seed(0)
    gal, rel = torch.randn(gallery, dim, generator=g), torch.arange(queries) % gallery
    q = torch.randn(queries, dim, generator=g)
    for s in range(0, queries, 65536):   # in place: no (Q, dim) temporary before the baseline
        q[s:s + 65536].mul_(1.2).add_(gal[rel[s:s + 65536]])
    base, t0 = peak(), time.perf_counter()
    m, ranks = ev.retrieval_metrics_from_embeddings(q, gal, rel, return_ranks=True)
    ev.bootstrap_interval((ranks == 1).float())   # the R@1 interval of every table
    print(f"{queries:>10,} {gallery:>9,} {dim:>4} {time.perf_counter() - t0:9.1f} {peak() - base:12.0f} "
          f"{(peak() - base) * 2**20 / queries:10.0f}  R@1 {100 * m['R@1']:.1f}", flush=True)


def status() -> str:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return ", ".join(f"{k} {int(fields[k].split()[0]) / 1024:.0f} MB" for k in ("VmRSS", "RssAnon", "RssFile") if k in fields)


def child(a: str, b: str, steps: int) -> None:
    import torch
    import diffgap as dg
    import embed_cache
    print(f"after imports: peak RSS {peak():.0f} MB")
    t0 = time.perf_counter()
    data = embed_cache.load(f"{a},{b}", "audio-video")
    print(f"load + check {data.summary()}\n  {time.perf_counter() - t0:.1f} s, peak RSS {peak():.0f} MB")
    train = data.splits["train"]
    t0 = time.perf_counter()
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=data.dims[0], dim_b=data.dims[1]))   # --dim other than 512 too
    model.fit_stats(train.a, train.b)
    print(f"fit_stats over {len(train.a):,} + {len(train.b):,} rows: {time.perf_counter() - t0:.1f} s, peak RSS {peak():.0f} MB")
    pa, pb = train.pairs()
    opt = dg.make_optimizer(model, 1e-3)
    t0 = time.perf_counter()
    for _ in dg.train_steps(model, pa, pb, opt, steps, 64, seed=0):
        pass
    print(f"{steps} training steps (batch 64, rows read from the mapped files): {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {peak():.0f} MB")
    print(f"now: {status()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dir", default=None, help="where to write the files (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the files (reused when present)")
    p.add_argument("--metrics", nargs="+", type=int, metavar="Q", help="instead: the metrics' peak memory at Q queries")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.steps) if args.child[0] != "metrics" else metrics_child(int(args.child[1]), args.dim)
    if args.metrics:
        print(f"{'queries':>10} {'gallery':>9} {'dim':>4} {'seconds':>9} {'peak MB more':>12} {'B/query':>10}")
        for n in args.metrics:   # a fresh process each: VmHWM only rises
            subprocess.run([sys.executable, __file__, "--child", "metrics", str(n), "--dim", str(args.dim)], check=True)
        return
    folder = args.dir or tempfile.mkdtemp(prefix="diffgap_bench_")
    a, b = (os.path.join(folder, f"{m}_{args.rows}x{args.dim}.npy") for m in ("audio", "video"))
    t0 = time.perf_counter()
    for seed, path in enumerate((a, b)):
        if not os.path.exists(path):
            write(path, args.rows, args.dim, seed)
    size = 2 * args.rows * args.dim * 4 / 2**20
    print(f"data: 2 x ({args.rows:,} x {args.dim}) float32 = {size:,.0f} MB on disk ({time.perf_counter() - t0:.0f} s to write)")
    try:
        subprocess.run([sys.executable, __file__, "--child", a, b, "--steps", str(args.steps)], check=True)
    finally:
        if not args.keep:
            for path in (a, b):
                os.remove(path)
            if not args.dir:
                os.rmdir(folder)


if __name__ == "__main__":
    main()
