"""Training step time against its matmul floor, measured side by side in one run.

    python benchmarks/bench_train_step.py                      # batch 64 (the paper's) and 1,024
    python benchmarks/bench_train_step.py --batch-sizes 64 --steps 500

The step is dg.train_steps as train.py runs it: default model (1.45 M parameters), default
synthetic-sized data (20,000 pairs of unit vectors, D = 512), loss, backward, Adam, EMA. The
floor is every matmul that step cannot avoid, timed alone at the same shapes, layouts and
thread count, as autograd calls them for nn.Linear (weight stored (out, in)): the forward
addmm(b, x, W^T), the weight gradient dy^T x, and the input gradient dy W where autograd needs
one (not for layers fed by x_t, the condition or the timestep features). The ratio step / floor is the
overhead factor: everything that is not a matmul (optimizer, EMA, small elementwise kernels,
Python) shows up in it. The "+ update" column adds what any Adam step must also do, timed alone
on the same parameters: the fused Adam update and the EMA lerp (read and write every parameter
and its moments), so step / (floor + update) is the overhead that is left to remove.
Times are medians over --repeats blocks of --steps steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffgap as dg  # noqa: E402


def linear_shapes(model: dg.DiffGAP) -> list[tuple[int, int, bool]]:
    """(in, out, needs_input_grad) of every Linear the training step runs, once each."""
    net, shapes = model.net, []
    leaves = {id(net.x_in[0]), id(net.c_in[0]), id(net.time_mlp[0])}   # inputs that need no gradient
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            shapes.append((m.in_features, m.out_features, id(m) not in leaves))
    return shapes


def time_it(fn, steps: int, repeats: int) -> float:
    """Median seconds per call over `repeats` blocks of `steps` calls (after one warm-up block)."""
    fn(steps)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(steps)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def matmul_floor(shapes, B: int, steps: int, repeats: int) -> float:
    """The calls autograd makes for nn.Linear, with its layouts: weight (out, in) contiguous."""
    calls = []
    for i, o, needs_grad in shapes:
        x, w, b, dy = torch.randn(B, i), torch.randn(o, i), torch.randn(o), torch.randn(B, o)
        calls += [(torch.addmm, (b, x, w.t())), (torch.mm, (dy.t(), x))]   # forward; weight gradient
        if needs_grad:
            calls.append((torch.mm, (dy, w)))                            # input gradient

    def run(n):
        for _ in range(n):
            for fn, args in calls:
                fn(*args)
    return time_it(run, steps, repeats)


def update_time(model: dg.DiffGAP, steps: int, repeats: int) -> float:
    """One fused Adam step and one EMA update of the model's parameters, with gradients present."""
    opt = dg.make_optimizer(model, 1e-3)
    for p in model.net.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    def run(n):
        for i in range(n):
            opt.step()
            model.update_ema(i)
    return time_it(run, steps, repeats)


def train_step_time(B: int, steps: int, repeats: int, compile: bool = False) -> tuple[float, dg.DiffGAP]:
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(20000, 512), dim=-1)
    b = torch.nn.functional.normalize(a + 0.8 * torch.randn(20000, 512), dim=-1)
    model = dg.DiffGAP(dg.DiffGAPConfig(switch_every=500))
    model.fit_stats(a, b)
    if compile:   # as train.py --compile does; the warm-up block below absorbs the compile time
        model.loss = torch.compile(model.loss, dynamic=False)
    opt = dg.make_optimizer(model, 1e-3)
    state = {"step": 0}

    def run(n):
        for _ in dg.train_steps(model, a, b, opt, n, B, start_step=state["step"]):
            pass
        state["step"] += n
    return time_it(run, steps, repeats), model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--steps", type=int, default=100, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the step with train.py --compile (~25 s to compile)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; optimizer: "
          f"{type(dg.make_optimizer(dg.DiffGAP(dg.DiffGAPConfig()))).__name__}")
    print(f"{'batch':>6}{'mode':>10}{'step ms':>10}{'floor ms':>10}{'ratio':>8}{'+ update ms':>13}{'ratio':>8}"
          f"{'steps/s':>10}")
    for B in args.batch_sizes:
        steps = max(10, args.steps * 64 // B)
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            step, model = train_step_time(B, steps, args.repeats, compile=mode == "compiled")
            floor = matmul_floor(linear_shapes(model), B, steps, args.repeats)
            update = floor + update_time(model, steps, args.repeats)
            print(f"{B:>6}{mode:>10}{step * 1e3:>10.2f}{floor * 1e3:>10.2f}{step / floor:>8.2f}{update * 1e3:>13.2f}"
                  f"{step / update:>8.2f}{1 / step:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
