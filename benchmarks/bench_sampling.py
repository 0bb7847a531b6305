"""Guided few-step sampling throughput against its matmul floor, side by side in one run.

    python benchmarks/bench_sampling.py                  # 1,000 queries x K = 16, 5 DDIM steps, guidance 16
    python benchmarks/bench_sampling.py --queries 200 --num-samples 4 --guidance 1

Times DiffGAP.sample_many as evaluation uses it: the K samples of a block of queries drawn as
one (K x n)-row batch (n chosen so K n <= --max-rows), and with guidance the conditional and
null passes stacked into one network call of 2 K n rows. The floor is the forward matmuls that
sampling cannot avoid (see floor() below), at the same row counts, timed alone with torch.mm in
the same process: sampling cannot be faster on the same BLAS. The ratio is the overhead factor
(elementwise work, the DDIM update, the sphere projection, Python).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffgap as dg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--guidance", type=float, default=16.0)
    p.add_argument("--max-rows", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig()).eval()
    cond = torch.nn.functional.normalize(torch.randn(args.queries, 512), dim=-1)
    kw = dict(steps=args.steps, guidance=args.guidance, max_rows=args.max_rows)

    def sampling():
        return model.sample_many(cond, 0, args.num_samples, **kw)

    # The matmuls sampling cannot avoid: per block of K n rows, the condition's projection once
    # (c_in, cond_mlp); per step, on the 2 K n rows of the guided call, x_in, every block's two
    # layers and the output layer. The time MLP sees one row per step (t is shared) and is left out.
    net = model.net
    per_block = max(1, args.max_rows // args.num_samples)
    passes = 1 if args.guidance == 1 else 2
    blocks = [args.num_samples * min(per_block, args.queries - i) for i in range(0, args.queries, per_block)]
    dims = lambda layers: [(m.in_features, m.out_features) for m in layers]
    once = dims([net.c_in[0], net.cond_mlp[1]])
    per_step = dims([net.x_in[0], *(fc for blk in net.blocks for fc in (blk.fc1, blk.fc2)), net.out[0]])
    work = [(rows, i, o) for rows in blocks for i, o in once] + \
           [(passes * rows, i, o) for _ in range(args.steps) for rows in blocks for i, o in per_step]
    mats = {key: (torch.randn(key[0], key[1]), torch.randn(key[1], key[2])) for key in set(work)}
    calls = [passes * rows for rows in blocks]

    def floor():
        for key in work:
            torch.mm(*mats[key])

    def best_of(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_sample, t_floor = best_of(sampling), best_of(floor)
    n = args.queries * args.num_samples
    print(f"{args.queries} queries x K={args.num_samples}, {args.steps} DDIM steps, guidance {args.guidance:g}, "
          f"network calls of {sorted(set(calls))} rows, {torch.get_num_threads()} threads")
    print(f"sampling {t_sample:.3f} s ({n / t_sample:,.0f} samples/s); matmul floor {t_floor:.3f} s "
          f"({n / t_floor:,.0f} samples/s); ratio {t_sample / t_floor:.2f}")


if __name__ == "__main__":
    main()
