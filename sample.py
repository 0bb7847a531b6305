"""Sample with a trained DiffGAP and evaluate it, or generate embeddings for your own conditions.

    python sample.py --steps 5                                  # newest checkpoint under runs/
    python sample.py --ckpt runs/audio-text/ckpt.pt --sampler ddpm --steps 1000
    python sample.py --direction b2a --cond video.npy --out audio_hat.npy

Evaluation prints, for each direction on the test split: R@1/5/10 for the contrastive,
diffgap, blend and two-way scores (DESIGN.md 4), the Frechet distance and mean paired cosine of
the generated embeddings (one sample per query), and samples per second. EMA weights are used.
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np
import torch

import diffgap as dg
import embed_cache
from train import (DIRECTIONS, RANK_GUIDANCE, ArgParser, check_dims, number, pick_device, rank_guidance,
                   retrieval_table, run_cli)


def parse_args(argv=None):
    p = ArgParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint (default: the newest runs/*/ckpt.pt)")
    p.add_argument("--steps", type=number(int, 1), default=5, help="sampling steps (paper: 50, 20 or 5)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--eta", type=number(float, 0), default=0.0, help="DDIM noise (0: deterministic)")
    p.add_argument("--guidance", type=number(float), default=1.0,
                   help="guidance scale of generated embeddings (--cond, FD, paired cos); 1: none")
    p.add_argument("--rank-guidance", type=number(float), default=RANK_GUIDANCE,
                   help="guidance scale of the K samples averaged for the diffgap / blend retrieval scores "
                        "(1 for models trained with --p-uncond 0)")
    p.add_argument("--num-samples", type=number(int, 1), default=16, help="K samples averaged for the diffgap score")
    p.add_argument("--blend", type=number(float, 0, 1), default=0.5, help="lambda of the blend score, in [0, 1]")
    p.add_argument("--direction", choices=["both", "b2a", "a2b"], default="both")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--data", help="data spec to evaluate on (default: the one stored in the checkpoint)")
    p.add_argument("--cond", help="FILE.npy of condition embeddings (N, D) to generate for (needs --out)")
    p.add_argument("--out", help="FILE.npy to write the generated embeddings to")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="auto: Triton kernels on CUDA, torch otherwise; triton on a CPU runs the interpreter (slow)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    return p.parse_args(argv)


def find_checkpoint(path: str | None) -> str:
    if path:
        return path
    found = glob.glob(os.path.join("runs", "**", "*.pt"), recursive=True)
    if not found:
        raise FileNotFoundError("no checkpoint under runs/: train one first, e.g. python train.py --pair audio-video")
    return max(found, key=os.path.getmtime)


def save_npy(path: str, x: torch.Tensor) -> None:
    """Write x as float32 .npy atomically and durably (dg.atomic_write)."""
    dg.atomic_write(path, lambda f: np.save(f, x.cpu().numpy().astype(np.float32)))


def generate_to_file(model: dg.DiffGAP, args, direction: int, device) -> None:
    if args.direction == "both":
        raise ValueError("--cond needs --direction b2a (condition is video/text) or a2b (condition is audio)")
    if not args.out:
        raise ValueError("--cond needs --out FILE.npy")
    cond = embed_cache.arrays.check_embeddings(embed_cache.arrays.read_array(args.cond), args.cond)
    want = model.config.dim_b if direction == 0 else model.config.dim_a
    if cond.shape[1] != want:
        raise ValueError(f"{args.cond}: condition dim {cond.shape[1]}, but the checkpoint expects {want}")
    g = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, guidance=args.guidance, generator=g)
    out = model.sample_many(cond.to(device), direction, args.num_samples, **kw).mean(0)
    save_npy(args.out, torch.nn.functional.normalize(out, dim=-1))
    print(f"wrote {args.out}: {tuple(out.shape)} unit-norm embeddings "
          f"(mean of {args.num_samples} samples, {args.steps} {args.sampler} steps)")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dg.KERNELS = args.kernels
    torch.manual_seed(args.seed)
    path = find_checkpoint(args.ckpt)
    model, ckpt = dg.load_checkpoint(path)
    model.to(device).eval()
    directions = {"both": (0, 1), "b2a": (0,), "a2b": (1,)}[args.direction]
    if args.cond:
        generate_to_file(model, args, directions[0], device)
        return 0

    data = embed_cache.load(args.data or ckpt["data"], ckpt["pair"])
    check_dims(data, model)
    split = data.splits[args.split]
    print(f"checkpoint {path} (step {ckpt['step']}); {data.summary()}")
    g = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, generator=g)
    rank_g = rank_guidance(model, args.rank_guidance)
    results, quality = {}, []
    for d in directions:
        q, gal, rel = (x.to(device) for x in split.retrieval(d))
        t0 = time.perf_counter()
        results[d], samples = dg.evaluate_retrieval(model, q, gal, rel, d, num_samples=args.num_samples,
                                                    blend=args.blend, guidance=rank_g, **kw)
        # samples drawn: K per query, and K per gallery item for the two-way score
        rate = samples.shape[0] * (samples.shape[1] + gal.shape[0]) / (time.perf_counter() - t0)
        # generation quality of embeddings as --cond would write them (guidance --guidance)
        one = samples[0] if args.guidance == rank_g else model.sample(q, d, guidance=args.guidance, **kw)  # (Q, D)
        # the raw conditions against the same targets: the modality gap before DiffGAP
        fd_cond = f"{dg.frechet_distance(q, gal):14.4f}" if q.shape[1] == gal.shape[1] else f"{'n/a':>14}"
        quality.append(f"{DIRECTIONS[d]:<10}{dg.frechet_distance(one, gal):10.4f}{fd_cond}"
                       f"{dg.paired_cosine(one, gal, rel):12.4f}{rate:12.0f}")
        if data.oracle is not None:
            results[d]["oracle"] = dg.retrieval_metrics(data.oracle(q.cpu(), gal.cpu(), d), rel.cpu())
    print(retrieval_table(results, f"{args.split} retrieval (%), {args.steps} {args.sampler} steps, "
                                   f"K={args.num_samples} samples averaged, guidance {rank_g:g}, "
                                   f"blend lambda={args.blend}:"))
    print(f"generation quality ({args.split} split, one sample per query, guidance {args.guidance:g}):")
    print(f"{'direction':<10}{'FD gen':>10}{'FD cond':>14}{'paired cos':>12}{'samples/s':>12}")
    print("\n".join(quality))
    print("FD gen / FD cond: Frechet distance of the generated / the raw condition embeddings to the real targets;"
          "\npaired cos: mean cosine of a generated embedding and its true pair(s); samples/s: retrieval samples (of the"
          "\nqueries and, for two-way, of the gallery items) incl. scoring.")
    if data.oracle is not None:
        print("oracle: the synthetic generator's own likelihood ranking (a reference ceiling, not a model)")
    return 0


if __name__ == "__main__":
    run_cli(main)
