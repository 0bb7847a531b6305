"""Sampling and training speed on the CPU, each beside the matmuls it cannot avoid, in one process.

    python benchmarks/bench_cpu.py        # 1,000 queries x K = 16, 5 DDIM steps, guidance 16; batches 64 and 1,024
    python benchmarks/bench_cpu.py --queries 200 --num-samples 4 --guidance 1 --batch-sizes 64

Sampling is DiffGAP.sample_many as evaluation runs it (the K samples of n queries as one K n-row batch,
the guided pair of passes as one call); its floor is the condition's projection per block and, per
step, every layer the rows pass through (the time MLP sees one row: left out). Training is
dg.train_steps as train.py runs it (the default model, 20,000 pairs: loss, backward, Adam, EMA); its
floor is what autograd runs for each nn.Linear (forward addmm(b, x, W^T), weight gradient dy^T x, and
input gradient dy W where one is needed), and "+ update" adds the fused Adam step and the EMA lerp,
timed alone. Each floor has the same shapes and threads; the ratio is the overhead (elementwise
kernels, the sampler's update, Python). Times are medians of --repeats runs after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import timeit

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffgap as dg  # noqa: E402


def seconds(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def linears(shapes, backward: bool):
    """A function that runs what nn.Linear costs for each (rows, in, out, input_grad) of shapes: the
    forward addmm(b, x, W^T) (the weight stored (out, in)); with backward, the weight gradient dy^T x
    and, where input_grad, the input gradient dy W."""
    calls = []
    for rows, i, o, input_grad in shapes:
        x, w, b, dy = torch.randn(rows, i), torch.randn(o, i), torch.randn(o), torch.randn(rows, o)
        calls.append((torch.addmm, (b, x, w.t())))
        calls += [(torch.mm, (dy.t(), x))] * backward + [(torch.mm, (dy, w))] * (backward and input_grad)
    return lambda: [fn(*a) for fn, a in calls]


def bench_sampling(args) -> None:
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig()).eval()
    cond = F.normalize(torch.randn(args.queries, 512), dim=-1)
    net, passes, per_block = model.net, 1 if args.guidance == 1 else 2, max(1, args.max_rows // args.num_samples)
    blocks = [args.num_samples * min(per_block, args.queries - i) for i in range(0, args.queries, per_block)]
    once = [net.c_in[0], net.cond_mlp[1]]   # per block of queries: the condition's projection
    per_step = [net.x_in[0], *(fc for blk in net.blocks for fc in (blk.fc1, blk.fc2)), net.out[0]]
    floor = linears([(rows, m.in_features, m.out_features, False) for rows in blocks for m in once] +
                    [(passes * rows, m.in_features, m.out_features, False) for _ in range(args.ddim_steps)
                     for rows in blocks for m in per_step], backward=False)
    t_sample = seconds(lambda: model.sample_many(cond, 0, args.num_samples, steps=args.ddim_steps,
                                                 guidance=args.guidance, max_rows=args.max_rows), args.repeats)
    t_floor, n = seconds(floor, args.repeats), args.queries * args.num_samples
    print(f"sampling: {args.queries} queries x K={args.num_samples}, {args.ddim_steps} DDIM steps, guidance "
          f"{args.guidance:g}, network calls of {sorted({passes * r for r in blocks})} rows")
    print(f"  {t_sample:.3f} s ({n / t_sample:,.0f} samples/s); matmul floor {t_floor:.3f} s "
          f"({n / t_floor:,.0f} samples/s); ratio {t_sample / t_floor:.2f}")


def bench_training(args) -> None:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(20000, 512), dim=-1)
    b = F.normalize(a + 0.8 * torch.randn(20000, 512), dim=-1)
    print(f"training: {'batch':>6}{'step ms':>10}{'floor ms':>10}{'ratio':>8}{'+ update ms':>13}{'ratio':>8}"
          f"{'steps/s':>10}")
    for B in args.batch_sizes:
        steps = max(10, args.train_steps * 64 // B)   # per timed run: about the same work at every batch size
        model = dg.DiffGAP(dg.DiffGAPConfig())
        model.fit_stats(a, b)
        opt, done = dg.make_optimizer(model), 0

        def train():
            nonlocal done
            for _ in dg.train_steps(model, a, b, opt, steps, B, start_step=done):
                pass
            done += steps
        step = seconds(train, args.repeats) / steps
        net = model.net
        leaves = {id(net.x_in[0]), id(net.c_in[0]), id(net.time_mlp[0])}   # their inputs need no gradient
        shapes = [(B, m.in_features, m.out_features, id(m) not in leaves)
                  for m in net.modules() if isinstance(m, torch.nn.Linear)]
        one = linears(shapes, backward=True)
        floor = seconds(lambda: [one() for _ in range(steps)], args.repeats) / steps

        def update():   # what any Adam step must do; the last training step left its gradients
            for i in range(steps):
                opt.step()
                model.update_ema(i)
        total = floor + seconds(update, args.repeats) / steps
        print(f"          {B:>6}{step * 1e3:>10.2f}{floor * 1e3:>10.2f}{step / floor:>8.2f}{total * 1e3:>13.2f}"
              f"{step / total:>8.2f}{1 / step:>10.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=16, help="K")
    p.add_argument("--ddim-steps", type=int, default=5)
    p.add_argument("--guidance", type=float, default=16.0)
    p.add_argument("--max-rows", type=int, default=4096)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--train-steps", type=int, default=100, help="training steps per timed run at batch 64")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_sampling(args)
    bench_training(args)


if __name__ == "__main__":
    main()
