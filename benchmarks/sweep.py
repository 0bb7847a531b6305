"""Where does DiffGAP lose to the baselines? Train variants side by side and print diffgap vs ridge and plug-in R@1.

    python benchmarks/sweep.py --variant base --variant "wide:inner=512" --variant "long:steps=12000" --seeds 0 1 2
    python benchmarks/sweep.py --variant base --eval "K=64,steps=1"

A variant is NAME[:key=value,...]; keys are DiffGAPConfig fields plus `steps` (training steps),
`lr` and `n_train` (synthetic training pairs; default 20,000). Every variant is trained on the synthetic audio-video default for each seed (data and
initialisation), then scored on the validation and test splits in both directions with every
--eval setting (K samples averaged, DDIM steps, guidance scale for models trained with
p_uncond > 0). Ridge and the Gaussian plug-in on the same split are the references.
Runs --workers processes with one thread each.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
from dataclasses import fields

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # baselines, paper_tables
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffgap as dg  # noqa: E402
import embed_cache  # noqa: E402
from baselines import fit_plugin, fit_ridge, ridge_predict  # noqa: E402
from paper_tables import PAPER_SWITCH, Job, sample_k, train  # noqa: E402


def parse_variant(text: str, default_steps: int) -> tuple[str, dict, int, float]:
    name, _, rest = text.partition(":")
    over, steps, lr = {}, default_steps, 1e-3
    known = {f.name: f.type for f in fields(dg.DiffGAPConfig)}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "steps":
            steps = int(value)
        elif key == "lr":
            lr = float(value)
        elif key == "n_train":
            over["n_train"] = int(value)   # goes to the synthetic data spec, not the config
        elif key in known:
            default = getattr(dg.DiffGAPConfig, key)
            over[key] = value if isinstance(default, str) else (value == "1" if isinstance(default, bool) else type(default)(value))
        else:
            raise SystemExit(f"variant {text!r}: unknown key {key!r}")
    if "switch_every" in over:
        over["switch_every"] = over["switch_every"] / steps  # train() takes it as a fraction of the run
    return name, over, steps, lr


def run(task):
    name, over, steps, lr, seed, evals, per_seed = task
    torch.set_num_threads(1)
    over = dict(over)
    extra = f",n_train={over.pop('n_train')}" if "n_train" in over else ""
    data = embed_cache.load(f"synthetic:seed={seed}{extra}", "audio-video")
    job = Job("audio-video", name, seed, data.spec, steps, 1, overrides=over, lr=lr)
    model = train(job, data)
    out = []
    # the references: ridge and the plug-in per direction, fitted once, in the base variant's rows
    ridges = {d: fit_ridge(model, data.splits["train"], data.splits["val"], d)[0] for d in (0, 1)} if name == "base" else {}
    plugins = {d: fit_plugin(data.splits["train"], data.splits["val"], d)[0] for d in ridges}
    for split in ("val", "test"):
        for d in (0, 1):
            q, g, rel = data.splits[split].retrieval(d)
            if d in ridges:
                out.append(("ridge", split, d, dg.retrieval_metrics_from_embeddings(ridge_predict(model, ridges[d], q, d), g, rel)["R@1"]))
                out.append(("plug-in", split, d, dg.retrieval_metrics(plugins[d].scores(q, g), rel)["R@1"]))
            for k, s, scale in evals:
                if scale != 1 and model.config.p_uncond == 0:
                    continue  # guidance needs a model trained with condition dropout
                samples, _ = sample_k(model, q, d, k, seed, steps=s, guidance=scale)
                r1 = dg.retrieval_metrics_from_embeddings(F.normalize(samples.mean(0), dim=-1), g, rel)["R@1"]
                out.append((f"{name} K={k} steps={s}" + (f" guidance={scale:g}" if scale != 1 else ""), split, d, r1))
    if per_seed:
        out = [(f"seed {seed}: {n}", split, d, v) for n, split, d, v in out]
    print(f"  {name} seed {seed} done", file=sys.stderr, flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--eval", action="append", help="K=16,steps=5[,guidance=4] (default K=16,steps=5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--per-seed", action="store_true", help="a row per seed instead of mean ± std")
    args = p.parse_args()
    evals = []
    for e in args.eval or ["K=16,steps=5"]:
        kv = dict(x.split("=") for x in e.split(","))
        evals.append((int(kv.get("K", 16)), int(kv.get("steps", 5)), float(kv.get("guidance", 1))))
    tasks = [(*parse_variant(v, args.steps), seed, evals, args.per_seed) for v in args.variant for seed in args.seeds]
    with mp.get_context("fork").Pool(args.workers) as pool:
        results = [r for rs in pool.map(run, tasks, chunksize=1) for r in rs]
    cells = {}
    for name, split, d, v in results:
        cells.setdefault((name, split, d), []).append(100 * v)
    names = sorted(dict.fromkeys(r[0] for r in results), key=lambda n: n.startswith("seed") and n.split(":")[0])
    print(f"R@1 (%), synthetic audio-video, seeds {args.seeds}, mean ± std; switch m = {PAPER_SWITCH['5000']:.3f} of the run")
    print("| variant | val B->A | val A->B | test B->A | test A->B |\n|---|---|---|---|---|")
    for n in names:
        vals = []
        for split in ("val", "test"):
            for d in (0, 1):
                x = cells[(n, split, d)]
                vals.append(f"{statistics.fmean(x):.1f} ± {statistics.stdev(x) if len(x) > 1 else 0:.1f}")
        print(f"| {n} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
