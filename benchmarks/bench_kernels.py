"""python benchmarks/bench_kernels.py [fused | topk | both] [--sizes 200000 1000000]: each kernel against what
it replaces, on the same inputs (a CPU runs the torch paths alone). fused: silu(x W^T + b + temb), 512 -> 224,
batch 64..4096, against torch eager and torch.compile (CUDA), with FLOP rate, bandwidth and peak memory. topk:
1,000 queries, D = 512, k = 10: cosine_topk (the kernel on CUDA, the chunked torch path on a CPU) against the
full score matrix and, on a CPU, faiss-cpu's exact IndexFlatIP where installed (optional; its time is the
search alone, its peak memory includes its copy of the gallery)."""
import argparse
import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
sync = torch.cuda.synchronize if CUDA else (lambda: None)


def timed(fn, reps=1):
    """(fn()'s last result, seconds per call), after one warm-up call (compiles, caches) when reps > 1."""
    for _ in range(reps > 1):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    sync()
    return out, (time.perf_counter() - t0) / reps


def memory_mb(reset: bool = False) -> float:
    """Peak MB since the last reset (CUDA: allocated; CPU: VmHWM, Linux); reset: start a window, MB in use."""
    sync()
    if CUDA:
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return (torch.cuda.memory_allocated() if reset else torch.cuda.max_memory_allocated()) / 2**20
    if reset:
        open("/proc/self/clear_refs", "w").write("5")   # VmHWM := VmRSS
    field = "VmRSS:" if reset else "VmHWM:"   # now, or the high-water mark
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


def bench_fused(dtype: torch.dtype, K=512, N=224) -> None:
    impls = {"torch": kernels.fused_linear_temb_silu_reference}
    if CUDA:
        impls["triton"], impls["torch.compile"] = kernels.fused_linear_temb_silu, torch.compile(impls["torch"])
    print(f"fused step {K} -> {N}, {dtype}" + ("" if CUDA else " (no CUDA: torch alone)") +
          f"\n{'B':>6} {'impl':<14} {'fwd us':>9} {'fwd+bwd us':>11} {'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>8}")
    for B in (64, 256, 1024, 4096):
        x, w, b, t, dy = (torch.randn(*s, device=DEVICE).to(dtype) for s in ((B, K), (N, K), (N,), (B, N), (B, N)))
        x, w, b, t = (a.requires_grad_() for a in (x, w / K ** 0.5, b, t))
        moved = (B * K + N * K + N + 2 * B * N) * x.element_size()
        for name, fn in impls.items():
            base = memory_mb(reset=True)
            with torch.no_grad():
                fwd = timed(lambda: fn(x, w, b, t), 50)[1]
            both = timed(lambda: fn(x, w, b, t).backward(dy), 50)[1]
            print(f"{B:>6} {name:<14} {fwd * 1e6:9.1f} {both * 1e6:11.1f} {2 * B * K * N / fwd / 1e12:8.3f} "
                  f"{moved / fwd / 1e9:8.1f} {memory_mb() - base:8.1f}")


def faiss_search(faiss, q, g, k):
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g.numpy())
    (_, i), secs = timed(lambda: index.search(q.numpy(), k))
    return torch.from_numpy(i), secs


def bench_topk(sizes: list, max_full_mb: float, queries=1000, D=512, k=10) -> None:
    faiss = importlib.import_module("faiss") if importlib.util.find_spec("faiss") else None   # optional
    dtype = torch.float16 if CUDA else torch.float32
    print(f"top-{k}, {queries} queries, D = {D}, {dtype}, {torch.get_num_threads()} threads, faiss "
          f"{faiss and faiss.__version__}\n{'gallery':>9} {'path':<12} {'seconds':>9} {'vs faiss':>9} "
          f"{'peak extra MB':>14} {'same indices':>13}")
    for n in sizes:
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q, g = (torch.nn.functional.normalize(torch.randn(m, D, device=DEVICE, generator=gen), dim=-1).to(dtype)
                for m in (queries, n))
        paths = {"streaming": lambda: timed(lambda: kernels.cosine_topk(q, g, k)[1])}
        if faiss is not None and not CUDA:
            paths["faiss"] = lambda: faiss_search(faiss, q, g, k)
        if queries * n * 4 / 2**20 <= max_full_mb:
            paths["full matrix"] = lambda: timed(lambda: kernels.cosine_topk_reference(q, g, k)[1])
        got = {}
        for name, fn in paths.items():   # every path first, so each row has its ratio to faiss
            base = memory_mb(reset=True)
            got[name] = (*fn(), memory_mb() - base)
        for name, (i, secs, mb) in got.items():
            vs = f"{secs / got['faiss'][1]:9.2f}" if "faiss" in got else " " * 9
            same = str(torch.equal(i.long(), got["streaming"][0])) if name != "streaming" else ""
            print(f"{n:>9} {name:<12} {secs:9.3f} {vs} {mb:14.0f} {same:>13}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", choices=["fused", "topk", "both"], default="both")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16", help="fused, on CUDA")
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000], help="topk: gallery rows")
    p.add_argument("--max-full-mb", type=float, default=1024, help="skip the full score matrix above this")
    a = p.parse_args()
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'cpu'}")
    if a.which in ("fused", "both"):
        bench_fused(getattr(torch, a.dtype) if CUDA else torch.float32)
    if a.which in ("topk", "both"):
        bench_topk(a.sizes, a.max_full_mb)
