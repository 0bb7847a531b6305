"""Fused linear + bias + temb + SiLU step: Triton vs torch eager (and torch.compile), forward + backward.

    python benchmarks/bench_fused_mlp.py            # on a CUDA machine

Shapes are the denoiser's hidden step (K = hidden = 512 -> N = inner = 224) over batch sizes
64..4096. Prints time per call, achieved FLOP rate and bandwidth (bytes the fused forward must
move: x, W, b, temb in, y out) and peak memory. Without CUDA it says so and times only the
torch reference on the CPU: the Triton figures need a GPU.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root


def bench(fn, reps=50):
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=reps) * 1e-3
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inner", type=int, default=224)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    import kernels
    K, N = args.hidden, args.inner
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; dtype {dtype}; K={K} -> N={N}")
    if not cuda:
        print("no CUDA: the Triton kernel would run under the interpreter, so only the torch reference is timed;"
              " the GPU comparison needs a CUDA machine and has not been measured here")
    ref = kernels.fused_linear_temb_silu_reference
    impls = {"torch": ref}
    if cuda:
        impls["triton"] = kernels.fused_linear_temb_silu
        try:
            impls["torch.compile"] = torch.compile(ref)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"torch.compile unavailable: {e}")
    print(f"{'B':>6} {'impl':<14} {'fwd us':>9} {'fwd+bwd us':>11} {'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>8}")
    for B in (64, 256, 1024, 4096):
        x = torch.randn(B, K, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype).requires_grad_()
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        t = torch.randn(B, N, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(B, N, device=device, dtype=dtype)
        moved = (B * K + N * K + N + 2 * B * N) * x.element_size()
        for name, fn in impls.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                t_fwd = bench(lambda: fn(x, w, b, t))
            t_all = bench(lambda: fn(x, w, b, t).backward(dy))
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            print(f"{B:>6} {name:<14} {t_fwd * 1e6:9.1f} {t_all * 1e6:11.1f} {2 * B * K * N / t_fwd / 1e12:8.3f}"
                  f" {moved / t_fwd / 1e9:8.1f} {peak:8.1f}")


if __name__ == "__main__":
    main()
