"""Sample with a trained DiffGAP and evaluate it, or generate embeddings for your own conditions.

    python sample.py --steps 5                                  # newest checkpoint under runs/
    python sample.py --ckpt runs/audio-text/ckpt.pt --sampler ddpm --steps 1000
    python sample.py --export-gallery index/                    # gallery vectors of the chosen score
    python sample.py --direction b2a --cond video.npy --out audio_hat.npy

Prints, for each direction of the test split, R@k of every score with 95% intervals (* marks the
one chosen on validation), then the Frechet distance and paired cosine of generated embeddings.
"""
from __future__ import annotations

import argparse

import torch

import diffgap as dg
import diffgap_eval as ev
import embed_cache
from diffgap_eval import ArgParser, number


def parse_args(argv=None):
    p = ArgParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint (default: the newest runs/*/ckpt.pt)")
    ev.add_sampling_options(p)
    p.add_argument("--rank-guidance", type=number(float), default=ev.RANK_GUIDANCE,
                   help="guidance scale of the K samples averaged for the learned scores (1 without condition dropout)")
    p.add_argument("--gallery-guidance", type=number(float), default=ev.GALLERY_GUIDANCE,
                   help=f"guidance scale of the gallery side of the two-way scores (default {ev.GALLERY_GUIDANCE:g})")
    p.add_argument("--score", type=ev.arg_type(lambda t: t if t == "auto" else ev.parse_score(t) and t),  # or raises
                   default="auto", help="the score to mark and export: auto (per direction, chosen on validation) or "
                   "a name: contrastive, diffgap, two-way, blend-L, two-way-blend-L")
    p.add_argument("--export-gallery", metavar="DIR", help="write the split's gallery vectors of the chosen score, "
                   "their ids and settings, for an inner-product index (queries: diffgap_eval.query_vectors)")
    p.add_argument("--direction", choices=ev.DIRECTION_CHOICES, default="both")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--data", help="data spec to evaluate on (default: the one stored in the checkpoint)")
    p.add_argument("--cond", help="FILE.npy of condition embeddings (N, D) to generate for (needs --out)")
    p.add_argument("--out", help="FILE.npy to write the generated embeddings to")
    return p.parse_args(argv)


def generate_to_file(model: dg.DiffGAP, args, direction: int, device) -> None:
    if args.direction == "both":
        raise ValueError("--cond needs --direction b2a (condition is video/text) or a2b (condition is audio)")
    if not args.out:
        raise ValueError("--cond needs --out FILE.npy")
    cond = embed_cache.arrays.check_embeddings(embed_cache.arrays.read_array(args.cond), args.cond)
    want = (model.config.dim_a, model.config.dim_b)[1 - direction]
    if cond.shape[1] != want:
        raise ValueError(f"{args.cond}: condition dim {cond.shape[1]}, but the checkpoint expects {want}")
    g = torch.Generator(device=device).manual_seed(args.seed)
    kw = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, guidance=args.guidance, generator=g, lam=1.0)
    out = model.translate(cond.to(device), direction, args.num_samples, **kw)   # generation: the K-sample mean
    ev.save_npy(args.out, torch.nn.functional.normalize(out, dim=-1))
    print(f"wrote {args.out}: {tuple(out.shape)} unit-norm embeddings "
          f"(mean of {args.num_samples} samples, {args.steps} {args.sampler} steps)")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ev.pick_device(args.device)
    ev.set_kernels(args.kernels, device)
    torch.manual_seed(args.seed)
    path = ev.find_checkpoint(args.ckpt)
    needs = () if args.cond else ("step", "pair") + (() if args.data else ("data",))
    model, ckpt = ev.load_checkpoint(path, needs=needs)
    model.to(device).eval()
    direction = ev.direction_arg(args.direction)
    directions = (0, 1) if direction is None else (direction,)
    if args.cond:
        generate_to_file(model, args, directions[0], device)
        return 0
    data = embed_cache.load(args.data or ckpt["run"]["data"], ckpt["run"]["pair"])
    ev.check_dims(data, model)
    names = ev.score_names(data.dims[0] == data.dims[1])
    if args.score not in ("auto", *names):   # a blend weight off the grid joins the candidates
        if data.dims[0] != data.dims[1]:
            raise ValueError(f"--score {args.score}: with dims {data.dims[0]}/{data.dims[1]} use one of {', '.join(names)}")
        names.append(args.score)
    print(f"checkpoint {path} (step {ckpt['step']}, translation shrinkage lam {model.lam[0]:g} B->A, {model.lam[1]:g} A->B); {data.summary()}")
    rank_g, gallery_g = ev.rank_guidance(model, args.rank_guidance), ev.rank_guidance(model, args.gallery_guidance)
    kw = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, guidance=rank_g, seed=args.seed,
              gallery_guidance=gallery_g)
    needed = [args.split] + (["val"] if args.score == "auto" and args.split != "val" else [])
    translations = {name: ev.translate_split(model, data.splits[name], args.num_samples, name=name, say=print, **kw)
                    for name in needed}
    split = data.splits[args.split]
    results, chosen, reasons, quality = {}, {}, {}, []
    for d in directions:
        results[d] = ev.split_scores(split, d, translations[args.split], names)
        if args.score == "auto":
            val = results[d] if args.split == "val" else ev.split_scores(data.splits["val"], d, translations["val"], names)
            chosen[d] = ev.choose_score(val)
            reasons[d] = ev.choice_reason(val, chosen[d])
            for name, m in results[d].items():
                m["val R@1"] = val[name]["R@1"]
        else:
            chosen[d] = args.score
        q, gal, rel = (x.to(device) for x in split.retrieval(d))
        # generation quality of embeddings as --cond would write them (one sample, guidance --guidance)
        g = torch.Generator(device=device).manual_seed(args.seed)
        one = model.sample(q, d, steps=args.steps, sampler=args.sampler, eta=args.eta, guidance=args.guidance,
                           generator=g)                                                               # (Q, D)
        # the raw conditions against the same targets: the modality gap before DiffGAP
        fd = lambda x: f"{ev.frechet_distance(x, gal):.4f}" if len(x) > 1 < len(gal) and x.shape[1] == gal.shape[1] else "n/a"
        quality.append(f"{ev.DIRECTIONS[d]:<10}{fd(one):>10}{fd(q):>14}{ev.paired_cosine(one, gal, rel):12.4f}")
        if data.oracle is not None:
            results[d]["oracle"] = ev.retrieval_metrics(data.oracle(q.cpu(), gal.cpu(), d), rel.cpu())
    if args.score == "auto":
        print("--score auto, chosen on the validation split:" + "".join(
            f"\n  {ev.DIRECTIONS[d]} {chosen[d]} (val R@1 {100 * results[d][chosen[d]]['val R@1']:.1f}): {reasons[d]}"
            for d in directions))
    print(ev.retrieval_table(results, f"{args.split} retrieval (%), {args.steps} {args.sampler} steps, "
                                   f"K={args.num_samples} samples averaged, {ev.guidance_words(rank_g, gallery_g)}; "
                                   f"* the score {'chosen on validation' if args.score == 'auto' else 'asked for'}:",
                          chosen))
    print("\n".join([f"generation quality ({args.split} split, one sample per query, guidance {args.guidance:g}):",
                     f"{'direction':<10}{'FD gen':>10}{'FD cond':>14}{'paired cos':>12}", *quality]))
    print("FD gen / FD cond: Frechet distance of the generated / the raw condition embeddings to the real targets;"
          "\npaired cos: mean cosine of a generated embedding and its true pair(s)." + (
              "\noracle: the synthetic generator's own likelihood ranking (a reference ceiling, not a model)" if data.oracle else ""))
    if args.export_gallery:
        info = dict(checkpoint=path, data=data.spec, split=args.split, num_samples=args.num_samples, steps=args.steps,
                    sampler=args.sampler, eta=args.eta, guidance=rank_g, gallery_guidance=gallery_g, seed=args.seed)
        for d in directions:
            ev.export_gallery(args.export_gallery, split, d, chosen[d], translations[args.split], info)
    return 0


if __name__ == "__main__":
    ev.run_cli(main)
