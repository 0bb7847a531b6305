"""Every method on three synthetic regimes: where DiffGAP helps, and where it should not.

    python benchmarks/regimes.py                  # 3 regimes x 2 pairs, seed 0 (~25 min on 2 cores)
    python benchmarks/regimes.py --quick          # tiny data and runs (~1 min): checks the plumbing

Regimes (embed_cache/synthetic.py): default; aligned (800 training pairs in a strong, well-aligned
space: contrastive test R@1 80-94, where a learned score should not help); multimodal (each
video has 4 plausible soundtracks it does not show: a regressor's mean falls between them).

DiffGAP is trained as `python train.py` trains it (its defaults: condition dropout 0.1, switch
every 500 steps, Adam 1e-3, batch 64, 30 epochs or at least diffgap_eval.MIN_STEPS steps) and scored as `python sample.py` scores it (K = 16
samples of 5-step DDIM, guidance 16, and 8 for two-way's gallery side; `auto` is the score
chosen on validation). Baselines on
the same splits: ridge and an MLP of the same size and steps (one-way, and two-way: each side
translated by the regressor of its direction), and the Gaussian plug-in. The oracle is the
generator's own likelihood (for multimodal a moment-matched Gaussian, not the Bayes rule).
Test split, R@1 with a 95% bootstrap interval over queries; FD of one sample (diffgap,
guidance 1) or of the prediction against the real targets. Writes --out and stdout.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffgap as dg  # noqa: E402
import embed_cache  # noqa: E402
from baselines import MLPBaseline, fit_plugin, fit_ridge, ridge_predict  # noqa: E402
from paper_tables import run_all  # noqa: E402
import diffgap_eval as ev  # noqa: E402
from diffgap_eval import GALLERY_GUIDANCE, MIN_STEPS, RANK_GUIDANCE, split_scores, translate_split  # noqa: E402

REGIMES = {"default": "synthetic", "aligned": "synthetic:preset=aligned", "multimodal": "synthetic:preset=multimodal"}
QUICK = ",n_train=600,n_val=100,n_test=100"
DIRS = {0: "B->A", 1: "A->B"}
METHODS = ["contrastive", "ridge", "ridge two-way", "mlp", "mlp two-way", "plug-in", "diffgap", "two-way", "auto",
           "oracle"]


def product_config(data) -> dg.DiffGAPConfig:
    """The model train.py builds by default: DiffGAPConfig's defaults (e.g. m = 500 steps)."""
    return dg.DiffGAPConfig(dim_a=data.dims[0], dim_b=data.dims[1])


def train(model: dg.DiffGAP, data, steps: int, seed: int) -> dg.DiffGAP:
    train_split = data.splits["train"]
    model.fit_stats(train_split.a, train_split.b)
    a, b = train_split.pairs()
    for _ in dg.train_steps(model, a, b, dg.make_optimizer(model), steps, 64, seed=seed):
        pass
    return model.eval()


def r1(metrics: dict) -> tuple[float, float, float]:
    return metrics["R@1"], metrics["R@1 lo"], metrics["R@1 hi"]


def with_interval(scores: torch.Tensor, relevant: torch.Tensor) -> tuple[float, float, float]:
    """R@1 and its 95% bootstrap interval from a dense (Q, G) score matrix (ties: lower index)."""
    first = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, 0]
    rel = relevant if relevant.dtype == torch.bool else torch.nn.functional.one_hot(relevant, scores.shape[1]).bool()
    hits = rel[torch.arange(len(first)), first].float()
    return (hits.mean().item(), *ev.bootstrap_interval(hits))


def run_job(job: tuple) -> list[tuple]:
    """One (regime, pair): train DiffGAP and the MLP, fit ridge and the plug-in, score the test split."""
    regime, pair, spec, seed, quick = job
    torch.set_num_threads(1)   # one process per core
    t0 = time.time()
    data = embed_cache.load(spec, pair)
    steps = max(30 * dg.steps_per_epoch(len(data.splits["train"].b), 64), MIN_STEPS if not quick else 200)
    torch.manual_seed(seed)
    model = train(dg.DiffGAP(product_config(data)), data, steps, seed)
    torch.manual_seed(seed)
    mlp = train(MLPBaseline(dg.DiffGAPConfig(**{**asdict(product_config(data)), "p_uncond": 0.0})), data, steps, seed)
    K = 4 if quick else 16
    kw = dict(num_samples=K, steps=5, guidance=RANK_GUIDANCE, gallery_guidance=GALLERY_GUIDANCE, seed=seed)
    tr = {name: translate_split(model, data.splits[name], **kw) for name in ("val", "test")}
    test, out = data.splits["test"], []
    for d in (0, 1):
        q, g, rel = test.retrieval(d)
        row = lambda method, value, fd=math.nan: out.append((regime, pair, DIRS[d], method, *value, fd))
        ridge = {e: fit_ridge(model, data.splits["train"], data.splits["val"], e)[0] for e in (d, 1 - d)}
        pred_q, pred_g = ridge_predict(model, ridge[d], q, d), ridge_predict(model, ridge[1 - d], g, 1 - d)
        mlp_q, mlp_g = mlp.predict(q, d), mlp.predict(g, 1 - d)
        one = lambda qv, gv: r1(ev.score_retrieval(q, g, rel, qv, gv, scores=["diffgap"])["diffgap"])
        two = lambda qv, gv: r1(ev.score_retrieval(q, g, rel, qv, gv, scores=["two-way"])["two-way"])
        row("contrastive", r1(ev.score_retrieval(q, g, rel, q, scores=["contrastive"])["contrastive"]),
            dg.frechet_distance(q, g))
        row("ridge", one(pred_q, None), dg.frechet_distance(pred_q, g))
        row("ridge two-way", two(pred_q, pred_g))
        row("mlp", one(mlp_q, None), dg.frechet_distance(mlp_q, g))
        row("mlp two-way", two(mlp_q, mlp_g))
        plugin, _ = fit_plugin(data.splits["train"], data.splits["val"], d)
        row("plug-in", with_interval(plugin.scores(q, g), rel))
        test_all, val_all = split_scores(test, d, tr["test"]), split_scores(data.splits["val"], d, tr["val"])
        sample = model.sample(q, d, steps=5, generator=torch.Generator().manual_seed(seed))   # guidance 1
        row("diffgap", r1(test_all["diffgap"]), dg.frechet_distance(sample, g))
        row("two-way", r1(test_all["two-way"]))
        chosen = ev.choose_score(val_all)
        out.append((regime, pair, DIRS[d], "auto", *r1(test_all[chosen]), math.nan, chosen))
        row("oracle", with_interval(data.oracle(q, g, d), rel))
    print(f"  {regime} {pair}: {steps} steps, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def report(records: list[tuple], args, minutes: float) -> str:
    lines = [f"# Every method on three synthetic regimes", "",
             f"`python benchmarks/regimes.py{' --quick' if args.quick else ''} --seed {args.seed}`; "
             f"{platform.machine()} CPU, {args.workers} worker(s) x 1 thread, {time.strftime('%Y-%m-%d')}, "
             f"{minutes:.1f} min. Test split, R@1 in % with its 95% bootstrap interval over queries; FD: of one "
             f"generated sample (diffgap, guidance 1) or the prediction (ridge, mlp), or of the raw condition "
             f"(contrastive: the modality gap). auto: the score chosen on the validation split (named).", ""]
    by = {(r[0], r[1], r[2], r[3]): r for r in records}
    for regime in REGIMES:
        pairs = sorted({r[1] for r in records if r[0] == regime})
        if not pairs:
            continue
        cols = [(p, d) for p in pairs for d in DIRS.values()]
        lines += [f"## {regime} (`{REGIMES[regime]}`)", "",
                  "| method | " + " | ".join(f"{p} {d}" for p, d in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for method in METHODS:
            cells = []
            for p, d in cols:
                rec = by.get((regime, p, d, method))
                if rec is None:
                    cells.append("")
                    continue
                cell = f"{100 * rec[4]:.1f} [{100 * rec[5]:.1f}, {100 * rec[6]:.1f}]"
                if not math.isnan(rec[7]):
                    cell += f", FD {rec[7]:.3f}"
                if method == "auto":
                    cell += f" ({rec[8]})"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated subset of " + ", ".join(REGIMES))
    p.add_argument("--pairs", default="audio-video,audio-text")
    p.add_argument("--seed", type=int, default=0, help="draws the data and the training (synthetic seed)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes, one thread each")
    p.add_argument("--quick", action="store_true", help=f"data{QUICK}, 200 steps, K=4")
    p.add_argument("--out", default="results/regimes.md")
    args = p.parse_args(argv)
    regimes, pairs = args.regimes.split(","), args.pairs.split(",")
    bad = [r for r in regimes if r not in REGIMES] + [x for x in pairs if x not in ("audio-video", "audio-text")]
    if bad or args.workers < 1:
        p.error(f"unknown regime or pair {bad[0]!r}" if bad else "--workers must be >= 1")
    spec = lambda r: REGIMES[r] + (":" if r == "default" else ",") + f"seed={args.seed}" + (QUICK if args.quick else "")
    jobs = [(r, pair, spec(r), args.seed, args.quick) for r in regimes for pair in pairs]
    jobs.sort(key=lambda j: j[0] == "aligned")   # the long ones first, so the pool ends evenly
    t0 = time.time()
    results = run_all(run_job, jobs, args.workers)
    text = report([r for rs in results for r in rs], args, (time.time() - t0) / 60)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ev.atomic_write(args.out, lambda f: f.write((text + "\n").encode()))
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
