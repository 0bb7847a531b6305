"""Cosine top-k: streaming (Triton on CUDA, chunked torch on CPU) vs faiss and the full score matrix.

    python benchmarks/bench_cosine_topk.py                   # CPU: 1k queries x 200k gallery x 512, k = 10
    python benchmarks/bench_cosine_topk.py --sizes 1000000   # the 1M gallery (full matrix skipped: 4 GB)

Prints time and peak extra memory for each path, in one run on the same unit vectors, and the
ratio to faiss-cpu's exact IndexFlatIP search when faiss is installed (`pip install faiss-cpu`;
optional: nothing in the project imports it). faiss's time is its search alone (its index
holds the gallery already); the streaming path normalises the gallery as it goes. On the CPU
peak memory is the process's resident-set high-water mark (reset before each path) minus
its resident set at the start; on CUDA it is torch.cuda.max_memory_allocated. The GPU figures need a CUDA machine.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> float:
    """Reset the peak-RSS mark to the current RSS (Linux clear_refs 5); returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-full-mb", type=float, default=1024, help="skip the full-matrix path above this")
    args = p.parse_args()
    import kernels
    try:
        import faiss
    except ImportError:
        faiss = None
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, {torch.get_num_threads()} threads; "
          f"{args.queries} queries, dim {args.dim}, k {args.k}; faiss: {faiss.__version__ if faiss else 'not installed'}")
    paths = {"streaming": lambda q, g: kernels.cosine_topk(q, g, args.k)}
    if faiss is not None and not cuda:
        def faiss_search(q, g):
            index = faiss.IndexFlatIP(g.shape[1])
            index.add(g.numpy())
            t0 = time.perf_counter()
            v, i = index.search(q.numpy(), args.k)
            return torch.from_numpy(v), torch.from_numpy(i), time.perf_counter() - t0
        paths["faiss"] = faiss_search
    paths["full matrix"] = lambda q, g: kernels.cosine_topk_reference(q, g, args.k)
    print(f"{'gallery':>9} {'path':<12} {'seconds':>9} {'vs faiss':>9} {'peak extra MB':>14} {'same indices':>13}")
    for n in args.sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        unit = lambda rows: torch.nn.functional.normalize(torch.randn(rows, args.dim, device=device, generator=gen), dim=-1).to(dtype)
        q, g = unit(args.queries), unit(n)
        results, seconds = {}, {}
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
                base = reset_peak()
            t0 = time.perf_counter()
            out = fn(q, g)
            if cuda:
                torch.cuda.synchronize()
            seconds[name] = out[2] if name == "faiss" else time.perf_counter() - t0
            results[name] = out[:2]
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mb("VmHWM") - base
            ratio = f"{seconds[name] / seconds['faiss']:9.2f}" if "faiss" in seconds else f"{'':>9}"
            same = f"{str(torch.equal(results[name][1].long(), results['streaming'][1])):>13}" if name != "streaming" else ""
            print(f"{n:>9} {name:<12} {seconds[name]:9.3f} {ratio} {extra:14.0f} {same}", flush=True)
        if "faiss" in seconds:
            print(f"{'':>9} streaming / faiss: {seconds['streaming'] / seconds['faiss']:.2f}x "
                  f"(faiss's peak includes its copy of the gallery)")


if __name__ == "__main__":
    main()
