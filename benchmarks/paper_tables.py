"""Regenerate analogues of the DiffGAP paper's Tables III-VII, with baselines, by one command.

    python benchmarks/paper_tables.py                  # synthetic default, 3 seeds (~50 min, 2 cores)
    python benchmarks/paper_tables.py --quick          # tiny data and runs (< 2 min): checks the plumbing
    python benchmarks/paper_tables.py --data pairs.npz --pair audio-text --seeds 3

Trains every model it needs (one worker process per core, one thread each), evaluates on the
test split, and writes markdown tables (mean +- std over seeds) to --out and to stdout:

    III / IV   retrieval in both directions: contrastive, ridge, mlp, the Gaussian plug-in,
               diffgap one-way and two-way, and blends
               (audio-text and audio-video on the synthetic default; --pair with --data)
    V          no diffusion module / one direction only / bidirectional split training
    VI         sampling steps 50, 20, 5, 2, 1, with samples per second
    VII        switching interval m, as the paper's fractions of the run (1000, 5000, 10000
               of ~94k iterations -> 1.06%, 5.3%, 10.6% of --steps)
    extras     objective, direction embedding, guidance scale, K samples averaged, blend weight

With the synthetic default, seed s also draws the data ("synthetic:seed=s"), so the spread
covers both new data and new initialisations; with --data only the training seed changes.
Ablations (V-VII, extras) run on audio-video for the synthetic default.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffgap as dg  # noqa: E402
import diffgap_eval as ev  # noqa: E402
import embed_cache  # noqa: E402
from baselines import MLPBaseline, fit_plugin, fit_ridge, ridge_predict  # noqa: E402

DIRS = {0: "B->A", 1: "A->B"}
PAPER_SWITCH = {"1000": 1000 / 94000, "5000": 5000 / 94000, "10000": 10000 / 94000}  # m as a fraction
STEP_SWEEP = (50, 20, 5, 2, 1)
K_SWEEP = (1, 4, 16)
BLEND_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
GUIDANCE_SWEEP = (1.0, 2.0, 4.0)
QUICK_DATA = "n_train=1000,n_val=100,n_test=100"


@dataclass
class Job:
    """One model to train and what to measure with it."""
    pair: str
    name: str                      # "main", "mlp", "b2a", "a2b", "m=1000", "eps", ...
    seed: int
    data: str                      # embed_cache spec
    steps: int                     # training steps
    num_samples: int               # K for the diffgap score
    overrides: dict = field(default_factory=dict)   # DiffGAPConfig fields
    direction: str = "both"        # "both", "b2a" or "a2b"
    lr: float = 1e-3               # Adam learning rate
    full: bool = False             # the main ablation model: run the sampling sweeps too


def data_spec(args, seed: int) -> str:
    if args.data != "synthetic":
        return args.data
    return f"synthetic:seed={seed}" + ("," + QUICK_DATA if args.quick else "")


def make_jobs(args) -> list[Job]:
    """Every (pair, variant, seed) to train; the biggest first so the pool ends evenly."""
    pairs = ["audio-text", "audio-video"] if args.data == "synthetic" else [args.pair]
    ablation_pair = "audio-video" if args.data == "synthetic" else args.pair
    jobs = []
    for seed in range(args.seeds):
        common = dict(seed=seed, data=data_spec(args, seed), steps=args.steps, num_samples=args.num_samples)
        for pair in pairs:
            jobs.append(Job(pair, "main", full=pair == ablation_pair, **common))
            jobs.append(Job(pair, "mlp", **common))
        p = ablation_pair
        jobs += [Job(p, "b2a", direction="b2a", **common), Job(p, "a2b", direction="a2b", **common)]
        jobs += [Job(p, f"m={k}", overrides={"switch_every": frac}, **common) for k, frac in PAPER_SWITCH.items()
                 if k != "5000"]  # 5000 is the main model's interval
        jobs += [Job(p, obj, overrides={"objective": obj}, **common) for obj in ("eps", "x0")]
        jobs.append(Job(p, "no-dir-emb", overrides={"direction_embedding": False}, **common))
        jobs.append(Job(p, "p_uncond=0.1", overrides={"p_uncond": 0.1}, **common))
    return sorted(jobs, key=lambda j: (not j.full, j.name != "main", j.seed))


# ----------------------------------------------------------------------------------------
# One job: train, then measure. Returns records (table, row, column, value).
# ----------------------------------------------------------------------------------------

def metric_records(table: str, row: str, m: dict) -> list[tuple]:
    keys = {"R@1": 100, "R@5": 100, "R@10": 100, "mAP@10": 100, "median_rank": 1}
    return [(table, row, "medR" if k == "median_rank" else k, m[k] * f) for k, f in keys.items()]


def train(job: Job, data) -> dg.DiffGAP:
    a, b = data.splits["train"].pairs()
    over = dict(job.overrides)
    over.setdefault("p_uncond", 0.0)   # the paper's method has no guidance; only the guidance table uses it
    over["switch_every"] = max(1, round(over.get("switch_every", PAPER_SWITCH["5000"]) * job.steps))
    config = dg.DiffGAPConfig(dim_a=data.dims[0], dim_b=data.dims[1], **over)
    torch.manual_seed(job.seed)
    model = (MLPBaseline if job.name == "mlp" else dg.DiffGAP)(config)
    model.fit_stats(data.splits["train"].a, data.splits["train"].b)
    optimizer = dg.make_optimizer(model, job.lr)
    for _ in dg.train_steps(model, a, b, optimizer, job.steps, 64, direction=job.direction,
                            seed=job.seed):
        pass
    return model.eval()


def sample_k(model, q, d, k, seed, **kw) -> tuple[torch.Tensor, float]:
    """k samples (k, Q, D) and the seconds they took."""
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    samples = torch.stack([model.sample(q, d, generator=g, **kw) for _ in range(k)])
    return samples, time.perf_counter() - t0


def run_job(job: Job) -> list[tuple]:
    torch.set_num_threads(1)  # one process per core
    t_start = time.time()
    data = embed_cache.load(job.data, job.pair)
    model = train(job, data)
    test, out = data.splits["test"], []
    dirs = {"both": (0, 1), "b2a": (0,), "a2b": (1,)}[job.direction]
    for d in dirs:
        q, g, rel = test.retrieval(d)
        score = lambda x: dg.retrieval_metrics_from_embeddings(x, g, rel)
        row = f"{job.pair}|{DIRS[d]}"
        if job.name == "mlp":
            pred = model.predict(q, d)
            out += metric_records("retrieval", f"{row}|mlp", score(pred))
            out += metric_records("retrieval", f"{row}|mlp blend", score(F.normalize(q, dim=-1) + pred))
            out += [("retrieval", f"{row}|mlp", "FD", dg.frechet_distance(pred, g)),
                    ("retrieval", f"{row}|mlp", "cos", dg.paired_cosine(pred, g, rel))]
            continue
        samples, _ = sample_k(model, q, d, job.num_samples, job.seed, steps=5)
        qn, g_hat = F.normalize(q, dim=-1), F.normalize(samples.mean(0), dim=-1)
        ranked = lambda x: score(F.normalize(x.mean(0), dim=-1))   # metrics of the mean of samples x
        fd, cos = dg.frechet_distance(samples[0], g), dg.paired_cosine(samples[0], g, rel)
        if job.name == "main":
            ridge, _ = fit_ridge(model, data.splits["train"], data.splits["val"], d)
            pred = ridge_predict(model, ridge, q, d)
            for method, x in {"contrastive": qn, "ridge": pred, "ridge blend": qn + pred,
                              "diffgap": g_hat, "diffgap blend": qn + g_hat}.items():
                out += metric_records("retrieval", f"{row}|{method}", score(x))
            plugin, _ = fit_plugin(data.splits["train"], data.splits["val"], d)
            out += metric_records("retrieval", f"{row}|plug-in", dg.retrieval_metrics(plugin.scores(q, g), rel))
            # two-way: the gallery translated the other way too (K samples each)
            q_hat = sample_k(model, g, 1 - d, job.num_samples, job.seed + 1, steps=5)[0].mean(0)
            out += metric_records("retrieval", f"{row}|diffgap two-way",
                                  ev.score_retrieval(q, g, rel, g_hat, q_hat, scores=["two-way"])["two-way"])
            if q.shape[1] == g.shape[1]:
                out += [("retrieval", f"{row}|contrastive", "FD", dg.frechet_distance(q, g)),
                        ("retrieval", f"{row}|contrastive", "cos", dg.paired_cosine(q, g, rel))]
            out += [("retrieval", f"{row}|ridge", "FD", dg.frechet_distance(pred, g)),
                    ("retrieval", f"{row}|ridge", "cos", dg.paired_cosine(pred, g, rel)),
                    ("retrieval", f"{row}|diffgap", "FD", fd), ("retrieval", f"{row}|diffgap", "cos", cos)]
            if not job.full:
                continue
        # ablation tables: each variant's 5-step, K-sample diffgap score in this direction
        main, D = score(g_hat), DIRS[d]
        variant = {"main": "bidirectional", "b2a": "one direction", "a2b": "one direction"}.get(job.name)
        if variant:
            out += metric_records("V", f"{variant}|{D}", main)
        if job.name in ("main", "m=1000", "m=10000"):
            out += metric_records("VII", f"{'5000' if job.name == 'main' else job.name[2:]}|{D}", main)
        if job.name in ("main", "eps", "x0"):
            obj = "v" if job.name == "main" else job.name
            out += metric_records("objective", f"{obj}|{D}", main) + [("objective", f"{obj}|{D}", "FD", fd)]
        if job.name in ("main", "no-dir-emb"):
            out += metric_records("direction embedding", f"{'on' if job.name == 'main' else 'off'}|{D}", main)
        if job.name == "p_uncond=0.1":
            for s in GUIDANCE_SWEEP:
                sg = samples if s == 1.0 else sample_k(model, q, d, job.num_samples, job.seed, steps=5, guidance=s)[0]
                out += metric_records("guidance", f"{s:g}|{D}", ranked(sg))
                out.append(("guidance", f"{s:g}|{D}", "FD", dg.frechet_distance(sg[0], g)))
        if job.name == "main":
            out += metric_records("V", f"no diffusion module (contrastive)|{D}", score(qn))
            for k in K_SWEEP:
                out += metric_records("K", f"{k}|{D}", ranked(samples[:k]))
            for lam in BLEND_SWEEP:  # (1 - lam) cos(q, g) + lam cos(g_hat, g), ranked via one query vector
                out += metric_records("blend", f"{lam:g}|{D}", score((1 - lam) * qn + lam * g_hat))
            for steps in STEP_SWEEP:
                s, secs = sample_k(model, q, d, job.num_samples, job.seed, steps=steps)
                out += metric_records("VI", f"{steps}|{D}", ranked(s))
                out += [("VI", f"{steps}|{D}", "FD", dg.frechet_distance(s[0], g)),
                        ("VI", f"{steps}|{D}", "samples/s", s.shape[0] * s.shape[1] / secs)]
    print(f"  {job.pair} {job.name} seed {job.seed}: {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------------------
# Aggregation over seeds and markdown rendering
# ----------------------------------------------------------------------------------------

def aggregate(records: list[tuple]) -> dict:
    """{(table, row, column): [value per seed]}."""
    cells = {}
    for table, row, col, value in records:
        cells.setdefault((table, row, col), []).append(value)
    return cells


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def render(cells: dict, table: str, title: str, rows: list[tuple[str, str]], cols: list[tuple[str, str, str, int]],
           first: str) -> str:
    """rows: (row key prefix, label); cols: (header, direction or '', metric, digits)."""
    lines = [f"### {title}", "", "| " + " | ".join([first] + [c[0] for c in cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for key, label in rows:
        cell = lambda d, m, n: fmt(cells.get((table, f"{key}|{d}" if d else key, m), []), n)
        lines.append("| " + " | ".join([label] + [cell(d, m, n) for _, d, m, n in cols]) + " |")
    return "\n".join(lines)


def r1_cols(extra=()):
    cols = [(f"{d} R@1", d, "R@1", 1) for d in DIRS.values()] + [(f"{d} R@10", d, "R@10", 1) for d in DIRS.values()]
    return cols + [(f"{d} {h}", d, m, n) for h, m, n in extra for d in DIRS.values()]


def report(cells: dict, args, pairs: list[str], ablation_pair: str, minutes: float) -> str:
    n = args.seeds
    head = [f"# DiffGAP paper tables (analogues), {args.data}{' (quick)' if args.quick else ''}", "",
            f"`python benchmarks/paper_tables.py{' --quick' if args.quick else ''}"
            f"{'' if args.data == 'synthetic' else f' --data {args.data} --pair {args.pair}'} --seeds {n}`; "
            f"{platform.machine()} CPU, {args.workers} worker(s) x 1 thread, {time.strftime('%Y-%m-%d')}, "
            f"{minutes:.1f} min. Test split; mean ± std over {n} seeds; R@k and mAP@10 in %, medR the median 1-based rank (the mean of the middle two for an even count; LAION-CLAP and open_clip print floor(median of 0-based ranks) + 1). "
            f"Every model: {args.steps} training steps, batch 64, Adam 1e-3, EMA; diffgap = mean of "
            f"K={args.num_samples} samples of 5-step DDIM (eta 0); blend = equal weights of the two cosines.", ""]
    out = list(head)
    methods = ["contrastive", "ridge", "mlp", "plug-in", "diffgap", "diffgap two-way", "ridge blend", "mlp blend",
               "diffgap blend"]
    metric_cols = [("R@1", "", "R@1", 1), ("R@5", "", "R@5", 1), ("R@10", "", "R@10", 1),
                   ("mAP@10", "", "mAP@10", 1), ("medR", "", "medR", 1), ("FD", "", "FD", 3), ("paired cos", "", "cos", 3)]
    for pair in pairs:
        num = "III" if pair == "audio-text" else "IV"
        rows = [(f"{pair}|{d}|{m}", f"{d} {m}") for d in DIRS.values() for m in methods]
        out += [render(cells, "retrieval", f"Table {num} analogue: {pair} retrieval", rows, metric_cols, "direction, score"),
                "", "FD and paired cos: of one generated sample (diffgap) or the prediction (ridge, mlp) per "
                "query, against the real targets; for contrastive, of the raw condition (the modality gap).", ""]
    ab = f" ({ablation_pair})"
    out += [render(cells, "V", "Table V analogue: bidirectional split training" + ab,
                   [("no diffusion module (contrastive)", "no diffusion module (contrastive)"),
                    ("one direction", "one direction only (a model per direction, same steps each)"),
                    ("bidirectional", "bidirectional split training")], r1_cols(), "model"), ""]
    out += [render(cells, "VI", "Table VI analogue: sampling steps" + ab, [(str(s), str(s)) for s in STEP_SWEEP],
                   r1_cols([("FD", "FD", 3), ("samples/s", "samples/s", 0)]), "DDIM steps"),
            "", "samples/s: per worker thread, K samples of every test query, while the other worker also runs.", ""]
    out += [render(cells, "VII", "Table VII analogue: switching interval m" + ab,
                   [(k, f"{k} of 94k ({100 * f:.2f}% = {max(1, round(f * args.steps))} of {args.steps} steps)")
                    for k, f in PAPER_SWITCH.items()], r1_cols(), "paper's m"), ""]
    out += ["## Extras" + ab, ""]
    out += [render(cells, "objective", "Objective", [(o, o) for o in ("eps", "x0", "v")], r1_cols([("FD", "FD", 3)]),
                   "predicts"), ""]
    out += [render(cells, "direction embedding", "Direction embedding", [("on", "on"), ("off", "off (paper-faithful)")],
                   r1_cols(), "direction embedding"), ""]
    out += [render(cells, "guidance", "Guidance scale (trained with p_uncond = 0.1)",
                   [(f"{s:g}", f"{s:g}") for s in GUIDANCE_SWEEP], r1_cols([("FD", "FD", 3)]), "scale"), ""]
    out += [render(cells, "K", "Samples averaged for the diffgap score", [(str(k), str(k)) for k in K_SWEEP],
                   r1_cols(), "K"), ""]
    out += [render(cells, "blend", "Blend weight lambda: (1 - lambda) contrastive + lambda diffgap",
                   [(f"{x:g}", f"{x:g}") for x in BLEND_SWEEP], r1_cols(), "lambda"), ""]
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="an embed_cache spec (default: the synthetic default)")
    p.add_argument("--pair", choices=["audio-video", "audio-text"], default="audio-video", help="with --data")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4000, help="training steps of every model")
    p.add_argument("--num-samples", type=int, default=16, help="K samples averaged for the diffgap score")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes, one thread each")
    p.add_argument("--quick", action="store_true", help=f"synthetic {QUICK_DATA}, 40 steps, 2 seeds, K=4")
    p.add_argument("--out", default="results/paper_tables.md")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.num_samples = 40, 4
        args.seeds = min(args.seeds, 2)
    if args.seeds < 1 or args.steps < 1 or args.workers < 1:
        p.error("--seeds, --steps and --workers must be positive")
    return args


def run_all(run, jobs: list, workers: int) -> list:
    """[run(job) for job in jobs] on `workers` processes (each should use one thread)."""
    if workers == 1:
        return [run(j) for j in jobs]
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(run, jobs, chunksize=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    embed_cache.load(data_spec(args, 0), args.pair)  # bad data fails here, before any training
    jobs = make_jobs(args)
    print(f"{len(jobs)} models to train ({args.steps} steps each) on {args.workers} worker(s)", file=sys.stderr)
    t0 = time.time()
    results = run_all(run_job, jobs, args.workers)
    cells = aggregate([r for rs in results for r in rs])
    pairs = sorted({j.pair for j in jobs if j.name == "main"})
    text = report(cells, args, pairs, next(j.pair for j in jobs if j.full), (time.time() - t0) / 60)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, args.out)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
