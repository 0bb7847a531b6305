"""The research driver: every method on the synthetic regimes, the paper's tables, a variant sweep.

    python benchmarks/research.py regimes       # every method, 3 regimes x 2 pairs, seed 0 -> results/regimes.md
    python benchmarks/research.py tables        # the paper's Tables III-VII and extras -> results/paper_tables.md
    python benchmarks/research.py tables --data pairs.npz --pair audio-text   # the same on your embeddings
    python benchmarks/research.py sweep --variant base --variant "cfg:p_uncond=0.1" --eval K=16,steps=5,guidance=8
    python benchmarks/research.py MODE --quick  # tiny data and runs: checks the plumbing in about a minute

regimes: the product as shipped (trained as train.py trains, scored as sample.py scores) beside ridge,
an MLP of its size, the Gaussian plug-in (baselines.py) and the generator's own likelihood, on each of
REGIMES (aligned: few pairs in a strong space, where a learned score should not help; multimodal:
soundtracks a video does not show, between which a regressor's mean falls). tables: the paper's
settings (no condition dropout, m = 5,000 of ~94k iterations as a fraction of --steps), mean +- std
over seeds that also draw the data. sweep: each --variant NAME[:key=value,...] (DiffGAPConfig fields,
steps, lr, n_train) from the paper's settings, with each --eval, beside ridge and the plug-in.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffgap as dg  # noqa: E402
import diffgap_eval as ev  # noqa: E402
import embed_cache  # noqa: E402
from baselines import MLPBaseline, fit_plugin, fit_ridge, ridge_predict  # noqa: E402

DIRS = ev.DIRECTIONS
REGIMES = {"default": "", "aligned": "preset=aligned", "multimodal": "preset=multimodal",   # synthetic options
           "aligned-250": "preset=aligned,n_train=250", "aligned-1000": "preset=aligned,n_train=1000"}
METHODS = ["contrastive", "ridge", "ridge two-way", "mlp", "mlp two-way", "plug-in", "diffgap, lam 1", "diffgap",
           "two-way", "auto", "oracle"]
QUICK, QUICK_STEPS = "n_train=600,n_val=100,n_test=100", 40   # --quick: this data, steps, K = 4, <= 2 seeds
PAPER_M = {"1000": 1000 / 94000, "5000": 5000 / 94000, "10000": 10000 / 94000}   # m as a fraction of the run
STEP_SWEEP, K_SWEEP, BLEND_SWEEP, GUIDANCE_SWEEP = (50, 20, 5, 2, 1), (1, 4, 16), (0, 0.25, 0.5, 0.75, 1), (1, 2, 4)
# tables: each model (settings over the paper's, trained direction) and the rows its diffgap score fills
NONE, ONE, BOTH = ("no diffusion module (contrastive)", "one direction only (a model per direction, same steps each)",
                   "bidirectional split training")
VARIANTS = {"main": ({}, None, [("V", BOTH), ("VII", "5000"), ("objective", "v"), ("direction embedding", "on")]),
            "b2a": ({}, 0, [("V", ONE)]), "a2b": ({}, 1, [("V", ONE)]),
            "m=1000": ({"m": PAPER_M["1000"]}, None, [("VII", "1000")]),
            "m=10000": ({"m": PAPER_M["10000"]}, None, [("VII", "10000")]),
            "eps": ({"objective": "eps"}, None, [("objective", "eps")]),
            "x0": ({"objective": "x0"}, None, [("objective", "x0")]),
            "no-dir-emb": ({"direction_embedding": False}, None, [("direction embedding", "off (paper-faithful)")]),
            "p_uncond=0.1": ({"p_uncond": 0.1}, None, [])}
# tables: the ablation tables, in order: (key, title, first column, rows, columns beside R@1 and R@10)
ABLATION_TABLES = [
    ("V", "Table V analogue: bidirectional split training", "model", (NONE, ONE, BOTH), ()),
    ("VI", "Table VI analogue: sampling steps", "DDIM steps", STEP_SWEEP, ("FD", "samples/s")),
    ("VII", "Table VII analogue: switching interval m", "paper's m", tuple(PAPER_M), ()),
    ("objective", "Objective", "predicts", ("eps", "x0", "v"), ("FD",)),
    ("direction embedding", "Direction embedding", "direction embedding", ("on", "off (paper-faithful)"), ()),
    ("guidance", "Guidance scale (trained with p_uncond = 0.1)", "scale", GUIDANCE_SWEEP, ("FD",)),
    ("K", "Samples averaged for the diffgap score", "K", K_SWEEP, ()),
    ("blend", "Blend weight lambda: (1 - lambda) contrastive + lambda diffgap", "lambda", BLEND_SWEEP, ())]


@dataclass
class Job:
    """One model to train (with the MLP beside it for the retrieval tables) and what to measure with it."""
    mode: str                     # "regimes", "tables" or "sweep"
    pair: str
    name: str                     # the regime, or the variant ("main", "b2a", "m=1000", a sweep NAME, ...)
    seed: int
    data: str                     # embed_cache spec
    steps: int | None             # training steps; None: train.py's (30 epochs, at least MIN_STEPS)
    K: int = 16                   # samples averaged for the diffgap score
    config: dict = field(default_factory=dict)   # DiffGAPConfig fields
    direction: int | None = None  # trained: None both (switching), 0 B->A only, 1 A->B only
    lr: float = 1e-3
    full: bool = False            # tables: the ablation pair's main model also runs the sampling sweeps
    evals: tuple = ()             # sweep: (K, DDIM steps, guidance) to score with


def synthetic(*options) -> str:
    """A synthetic data spec from options (falsy ones left out); of two equal keys the later wins."""
    text = ",".join(filter(None, options))
    return f"synthetic:{text}" if text else "synthetic"


def paper(steps: int, m: float = PAPER_M["5000"], **config) -> dict:
    """The paper's settings as DiffGAPConfig fields: no condition dropout, switching every m of the run."""
    return {"p_uncond": 0.0, "switch_every": max(1, round(m * steps)), "shrink": False, **config}


def train(job: Job, data, mlp: bool = False, **config) -> dg.DiffGAP:
    """A model trained as train.py trains it: Adam, batch 64, every draw from (seed, step)."""
    torch.manual_seed(job.seed)   # the initialisation
    cfg = dg.DiffGAPConfig(dim_a=data.dims[0], dim_b=data.dims[1], **{**job.config, **config})
    model = (MLPBaseline if mlp else dg.DiffGAP)(cfg)
    tr = data.splits["train"]
    model.fit_stats(tr.a, tr.b)
    steps = job.steps or max(30 * dg.steps_per_epoch(len(tr.b), 64), ev.MIN_STEPS)
    for _ in dg.train_steps(model, *tr.pairs(), dg.make_optimizer(model, job.lr), steps, 64,
                            direction=job.direction, seed=job.seed):
        pass
    return model.eval()


def sample(model, q, d: int, K: int, seed: int, steps: int = 5, **kw) -> torch.Tensor:
    """K samples for each query (K, Q, D), drawn as evaluation draws them."""
    return model.sample_many(q, d, K, steps=steps, generator=torch.Generator().manual_seed(seed), **kw)


def records(table: str, row: str, m: dict, prefix: str = "", **extra) -> list[tuple]:
    """(table, row, column, value) of the retrieval metrics m in % (medR as it is) and of extra values."""
    values = {k: 100 * m[k] for k in ("R@1", "R@1 lo", "R@1 hi", "R@5", "R@10", "mAP@10") if k in m}
    return [(table, row, prefix + k, v) for k, v in {**values, "medR": m["median_rank"], **extra}.items()]


def dense_metrics(scores: torch.Tensor, rel: torch.Tensor) -> dict:
    """retrieval_metrics of a dense (Q, G) score matrix, with R@1's 95% interval as score_retrieval's."""
    m, first = ev.retrieval_metrics(scores, rel, return_ranks=True)
    return dict(m, **dict(zip(("R@1 lo", "R@1 hi"), ev.bootstrap_interval((first == 1).float()))))


# What a job measures: it trains its model(s) and returns records (table, row, column, value) --------------

def retrieval(job: Job, data, model, mlp) -> list[tuple]:
    """Every score (as sample.py scores) and baseline on the test split both ways: records (NAME PAIR,
    D METHOD, metric, value), FD and paired cos of one sample (guidance 1) or prediction per query."""
    tr, val, test, out = *(data.splits[s] for s in ("train", "val", "test")), []
    kw = dict(num_samples=job.K, guidance=ev.rank_guidance(model, ev.RANK_GUIDANCE),
              gallery_guidance=ev.rank_guidance(model, ev.GALLERY_GUIDANCE), seed=job.seed)
    translations = {}
    if job.mode == "regimes" or model.config.shrink:   # validation: lam, then auto's choice, as train.py and sample.py
        translations["val"] = (ev.fit_shrinkage if model.config.shrink else ev.translate_split)(model, val, **kw)
        out.extend((f"{job.name} {job.pair}", f"{DIRS[d]} diffgap", "lam", float(model.lam[d])) for d in (0, 1))
    translations["test"] = ev.translate_split(model, test, **kw)
    unshrunk = ev.translate_split(model, test, lam=1.0, **kw)   # beside the default: the paper's translation
    ridges = {d: fit_ridge(model, tr, val, d)[0] for d in (0, 1)}
    for d in (0, 1):
        q, g, rel = test.retrieval(d)
        gen = lambda x: {} if x is None else {"FD": ev.frechet_distance(x, g),
                                              "paired cos": ev.paired_cosine(x, g, rel)}
        add = lambda method, m, x=None: out.extend(records(f"{job.name} {job.pair}", f"{DIRS[d]} {method}", m,
                                                           **gen(x)))
        scores = ev.split_scores(test, d, translations["test"])
        add("contrastive", scores["contrastive"], q)
        add("diffgap", scores["diffgap"], sample(model, q, d, 1, job.seed)[0])   # FD: of one sample, guidance 1
        add("diffgap, lam 1", ev.split_scores(test, d, unshrunk, ["contrastive", "diffgap"])["diffgap"])
        add("diffgap blend", scores["blend-0.5"])   # a blend: equal weights of the two cosines
        add("diffgap two-way", scores["two-way"])
        for name, reg_q, reg_g in (("ridge", ridge_predict(model, ridges[d], q, d),
                                    ridge_predict(model, ridges[1 - d], g, 1 - d)),
                                   ("mlp", mlp.predict(q, d), mlp.predict(g, 1 - d))):
            m = ev.score_retrieval(q, g, rel, reg_q, reg_g, scores=["diffgap", "blend-0.5", "two-way"])
            for end, score, x in (("", "diffgap", reg_q), (" blend", "blend-0.5", None), (" two-way", "two-way", None)):
                add(name + end, m[score], x)
        add("plug-in", dense_metrics(fit_plugin(tr, val, d)[0].scores(q, g), rel))
        if data.oracle is not None:
            add("oracle", dense_metrics(data.oracle(q, g, d), rel))
        if "val" in translations:
            chosen = ev.choose_score(ev.split_scores(val, d, translations["val"]))
            add("auto", scores[chosen])
            out.append((f"{job.name} {job.pair}", f"{DIRS[d]} auto", "chosen", chosen))
    return out


def measure_regime(job: Job, data) -> list[tuple]:
    return retrieval(job, data, train(job, data), train(job, data, mlp=True, p_uncond=0.0))


def measure_tables(job: Job, data) -> list[tuple]:
    model = train(job, data)
    out = retrieval(job, data, model, train(job, data, mlp=True)) if job.name == "main" else []
    if job.name == "main" and not job.full:
        return out
    for d in (0, 1) if job.direction is None else (job.direction,):   # the ablations: K samples, 5 DDIM steps
        q, g, rel = data.splits["test"].retrieval(d)
        D, qn = DIRS[d] + " ", F.normalize(q, dim=-1)
        score = lambda x: ev.retrieval_metrics_from_embeddings(x, g, rel)
        x = sample(model, q, d, job.K, job.seed)
        g_hat = F.normalize(x.mean(0), dim=-1)
        m, fd = score(g_hat), ev.frechet_distance(x[0], g)
        for table, key in VARIANTS[job.name][2]:
            out += records(table, key, m, D, FD=fd)
        if job.name == "p_uncond=0.1":
            for s in GUIDANCE_SWEEP:
                xs = x if s == 1 else sample(model, q, d, job.K, job.seed, guidance=s)
                out += records("guidance", str(s), score(xs.mean(0)), D, FD=ev.frechet_distance(xs[0], g))
        if job.name == "main":
            out += records("V", NONE, score(qn), D)
            out += [r for k in K_SWEEP for r in records("K", str(k), score(x[:k].mean(0)), D)]
            out += [r for lam in BLEND_SWEEP
                    for r in records("blend", str(lam), score((1 - lam) * qn + lam * g_hat), D)]
            for steps in STEP_SWEEP:
                t0 = time.perf_counter()
                xs = sample(model, q, d, job.K, job.seed, steps=steps)
                out += records("VI", str(steps), score(xs.mean(0)), D, FD=ev.frechet_distance(xs[0], g),
                               **{"samples/s": xs.shape[0] * xs.shape[1] / (time.perf_counter() - t0)})
    return out


def measure_sweep(job: Job, data) -> list[tuple]:
    model = train(job, data)
    tr, val, out = data.splits["train"], data.splits["val"], []
    refs = (0, 1) if job.name == "base" else ()   # ridge and the plug-in, once, beside the base variant
    ridges, plugins = {d: fit_ridge(model, tr, val, d)[0] for d in refs}, {d: fit_plugin(tr, val, d)[0] for d in refs}
    for split in ("val", "test"):
        for d in (0, 1):
            q, g, rel = data.splits[split].retrieval(d)
            r1 = lambda name, m: out.append(("sweep", name, f"{split} {DIRS[d]}", 100 * m["R@1"]))
            if d in ridges:
                r1("ridge", ev.retrieval_metrics_from_embeddings(ridge_predict(model, ridges[d], q, d), g, rel))
                r1("plug-in", ev.retrieval_metrics(plugins[d].scores(q, g), rel))
            for K, steps, scale in job.evals:
                if scale == 1 or model.config.p_uncond > 0:   # guidance needs a model trained with condition dropout
                    x = sample(model, q, d, K, job.seed, steps=steps, guidance=scale)
                    r1(f"{job.name} K={K} steps={steps}" + (f" guidance={scale:g}" if scale != 1 else ""),
                       ev.retrieval_metrics_from_embeddings(x.mean(0), g, rel))
    return out


def run_job(job: Job) -> list[tuple]:
    torch.set_num_threads(1)   # one process per core
    t0 = time.time()
    out = MODES[job.mode][1](job, embed_cache.load(job.data, job.pair))
    print(f"  {job.pair} {job.name} seed {job.seed}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


# The jobs of each mode -------------------------------------------------------------------------------------

def regime_jobs(args) -> list[Job]:
    jobs = [Job("regimes", pair, r, args.seeds[0], synthetic(REGIMES[r], f"seed={args.seeds[0]}", args.quick and QUICK),
                QUICK_STEPS if args.quick else None, args.num_samples) for r in args.regimes for pair in args.pairs]
    return sorted(jobs, key=lambda j: j.name.startswith("aligned"))   # few pairs, short: last, so the pool ends evenly


def table_jobs(args) -> list[Job]:
    pairs = ["audio-text", "audio-video"] if args.data == "synthetic" else [args.pair]
    jobs, ab = [], pairs[-1]   # ab: the ablations' pair
    for seed in args.seeds:
        spec = synthetic(f"seed={seed}", args.quick and QUICK) if args.data == "synthetic" else args.data
        job = lambda pair, name, direction=None, full=False, **settings: Job(
            "tables", pair, name, seed, spec, args.steps, args.num_samples, paper(args.steps, **settings), direction,
            full=full)
        jobs += [job(pair, "main", full=pair == ab) for pair in pairs if pair != ab]
        jobs += [job(ab, name, d, full=name == "main", **settings) for name, (settings, d, _) in VARIANTS.items()]
    return sorted(jobs, key=lambda j: (not j.full, j.name != "main", j.seed))   # the longest first


def sweep_jobs(args) -> list[Job]:
    options = lambda text: dict(item.partition("=")[::2] for item in filter(None, text.split(",")))
    evals = tuple((int(o.get("K", 16)), int(o.get("steps", 5)), float(o.get("guidance", 1)))
                  for o in map(options, args.eval or ["K=16,steps=5"]))
    known, jobs = {f.name: type(f.default) for f in fields(dg.DiffGAPConfig)}, []
    for text in args.variant:
        name, _, rest = text.partition(":")
        opts = options(rest)
        steps, lr, n_train = int(opts.pop("steps", args.steps)), float(opts.pop("lr", 1e-3)), opts.pop("n_train", "")
        if opts.keys() - known.keys():
            raise ValueError(f"variant {text!r}: unknown {sorted(opts.keys() - known.keys())} (use DiffGAPConfig "
                             f"fields, steps, lr, n_train)")
        config = {k: v in ("1", "true", "True") if known[k] is bool else known[k](v) for k, v in opts.items()}
        steps = QUICK_STEPS if args.quick else steps
        jobs += [Job("sweep", "audio-video", name, seed, synthetic(f"seed={seed}", n_train and f"n_train={n_train}",
                                                                   args.quick and QUICK),
                     steps, config=paper(steps, **config), lr=lr, evals=evals) for seed in args.seeds]
    return jobs


# Reports ---------------------------------------------------------------------------------------------------

def markdown(first: str, rows: list[tuple[str, str]], cols: list[str], cell) -> list[str]:
    """A markdown table: rows (key, label), cols column keys, cell(row key, column key) the text."""
    return ["| " + " | ".join([first, *cols]) + " |", "|---|" + "---|" * len(cols)] + \
           ["| " + " | ".join([label] + [cell(key, c) for c in cols]) + " |" for key, label in rows]


def mean_std(cells: dict, table: str):
    """cell() of a table's mean +- std over seeds, "-" where there is no value (FD of a blend, ...)."""
    def cell(row, col):
        values = cells.get((table, row, col), [])
        digits = 3 if col.endswith(("FD", "cos")) else 0 if col.endswith("/s") else 1
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}" if values else "-"
    return cell


def command(args, minutes: float) -> str:
    return (f"`python benchmarks/research.py {shlex.join(args.argv)}`; {platform.machine()} CPU, {args.workers} "
            f"worker(s) x 1 thread, {time.strftime('%Y-%m-%d')}, {minutes:.1f} min.")


def regimes_report(cells: dict, args, minutes: float) -> str:
    lines = ["# Every method on the synthetic regimes", "",
             command(args, minutes) + " Test split, R@1 in % with its 95% bootstrap interval over queries; FD: of one "
             "generated sample (diffgap, guidance 1) or the prediction (ridge, mlp), or of the raw condition "
             "(contrastive: the modality gap). auto: the score chosen on the validation split (named).", ""]
    rows = [("diffgap two-way" if m == "two-way" else m, m) for m in METHODS]
    for r in args.regimes:
        def cell(method, col):
            pair, d = col.split()
            get = lambda key: cells.get((f"{r} {pair}", f"{d} {method}", key), [None])[0]
            return (f"{get('R@1'):.1f} [{get('R@1 lo'):.1f}, {get('R@1 hi'):.1f}]" + (f", FD {get('FD'):.3f}" if
                    get("FD") is not None else "") + (f" ({get('chosen')})" if get("chosen") else "") +
                    (f" (lam {get('lam'):g})" if get("lam") is not None else ""))
        lines += [f"## {r} (`{synthetic(REGIMES[r])}`)", "",
                  *markdown("method", rows, [f"{p} {d}" for p in sorted(args.pairs) for d in DIRS.values()], cell), ""]
    return "\n".join(lines)


def tables_report(cells: dict, args, minutes: float) -> str:
    pairs = ["audio-text", "audio-video"] if args.data == "synthetic" else [args.pair]
    ab = f" ({pairs[-1]})"
    out = [f"# DiffGAP paper tables (analogues), {args.data}{' (quick)' if args.quick else ''}", "",
           command(args, minutes) + f" Test split; mean ± std over {len(args.seeds)} seeds; R@k and mAP@10 in %. "
           f"Every model: {args.steps} training steps, batch 64, Adam 1e-3, EMA; diffgap = mean of "
           f"K={args.num_samples} samples of 5-step DDIM (eta 0); blend = equal weights of the two cosines.", "",
           ev.MEDR_LEGEND, ""]
    methods = ["contrastive", "ridge", "mlp", "plug-in", "diffgap", "diffgap two-way", "ridge blend", "mlp blend",
               "diffgap blend"]
    for pair in pairs:
        rows = [(f"{d} {m}", f"{d} {m}") for d in DIRS.values() for m in methods]
        out += [f"### Table {'III' if pair == 'audio-text' else 'IV'} analogue: {pair} retrieval", "",
                *markdown("direction, score", rows, ["R@1", "R@5", "R@10", "mAP@10", "medR", "FD", "paired cos"],
                          mean_std(cells, f"main {pair}")), "",
                "FD and paired cos: of one generated sample (diffgap) or the prediction (ridge, mlp) per query, "
                "against the real targets; for contrastive, of the raw condition (the modality gap).", ""]
    for key, title, first, rows, extra in ABLATION_TABLES:
        label = lambda k: (f"{k} of 94k ({100 * PAPER_M[k]:.2f}% = {max(1, round(PAPER_M[k] * args.steps))} of "
                           f"{args.steps} steps)" if key == "VII" else str(k))
        cols = [f"{d} {m}" for m in ("R@1", "R@10", *extra) for d in DIRS.values()]
        out += [f"## Extras{ab}", ""] if key == "objective" else []
        out += [f"### {title}{ab if key in ('V', 'VI', 'VII') else ''}", "",
                *markdown(first, [(str(k), label(k)) for k in rows], cols, mean_std(cells, key)), ""]
        if key == "VI":
            out += ["samples/s: per worker thread, K samples of every test query, while the other worker runs.", ""]
    return "\n".join(out)


def sweep_report(cells: dict, args, minutes: float) -> str:
    rows = list(dict.fromkeys(row for _, row, _ in cells))
    if args.per_seed:   # each seed's rows together
        rows.sort(key=lambda r: int(r.split(":")[0].split()[1]))
    return "\n".join([f"R@1 (%), synthetic audio-video, seeds {args.seeds}, mean ± std; switch m = "
                      f"{PAPER_M['5000']:.3f} of the run unless set. " + command(args, minutes), "",
                      *markdown("variant", [(r, r) for r in rows], [f"{s} {d}" for s in ("val", "test")
                                                                    for d in DIRS.values()], mean_std(cells, "sweep"))])


# mode: (its jobs, what a job measures, the report, the default --out)
MODES = {"regimes": (regime_jobs, measure_regime, regimes_report, "results/regimes.md"),
         "tables": (table_jobs, measure_tables, tables_report, "results/paper_tables.md"),
         "sweep": (sweep_jobs, measure_sweep, sweep_report, None)}


def parse_args(argv=None):
    p = ev.ArgParser(prog="research.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=MODES)
    p.add_argument("--quick", action="store_true", help=f"{QUICK}, {QUICK_STEPS} steps, K=4, <= 2 seeds: the plumbing")
    p.add_argument("--workers", type=ev.number(int, 1), default=min(2, os.cpu_count() or 1), help="1-thread processes")
    p.add_argument("--out", help="markdown file (default: results/regimes.md, results/paper_tables.md, sweep none)")
    p.add_argument("--seeds", type=ev.number(int, 0), nargs="+", help="data and training (default 0; tables 0 1 2)")
    p.add_argument("--num-samples", type=ev.number(int, 1), default=16, help="regimes, tables: K samples averaged")
    p.add_argument("--steps", type=ev.number(int, 1), default=4000, help="tables, sweep: training steps of each model")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES), help="regimes: the regimes")
    p.add_argument("--pairs", nargs="+", choices=ev.PAIRS, default=list(ev.PAIRS), help="regimes: the pairs")
    p.add_argument("--data", default="synthetic", help="tables: an embed_cache spec (default: the synthetic default)")
    p.add_argument("--pair", choices=ev.PAIRS, default="audio-video", help="tables: the pair of --data")
    p.add_argument("--variant", action="append", default=[], help="sweep: NAME[:key=value,...]; repeatable")
    p.add_argument("--eval", action="append", help="sweep: K=16,steps=5[,guidance=4] (K=16,steps=5); repeatable")
    p.add_argument("--per-seed", action="store_true", help="sweep: a row per seed instead of mean ± std")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.seeds = args.seeds or ([0, 1, 2] if args.mode == "tables" else [0])
    if args.quick:
        args.steps, args.num_samples, args.seeds = QUICK_STEPS, 4, args.seeds[:2]
    if args.mode == "regimes" and len(args.seeds) > 1 or args.mode == "sweep" and not args.variant:
        p.error("regimes takes one seed" if args.mode == "regimes" else "sweep needs a --variant")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    make_jobs, _, report, default_out = MODES[args.mode]
    jobs = make_jobs(args)
    embed_cache.load(jobs[0].data, jobs[0].pair)   # bad data fails here, before any training
    print(f"{len(jobs)} jobs on {args.workers} worker(s)", file=sys.stderr)
    t0, cells = time.time(), {}
    with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(args.workers) as pool:
        results = pool.map(run_job, jobs, chunksize=1)
    for job, recs in zip(jobs, results):
        for table_, row, col, value in recs:
            row = f"seed {job.seed}: {row}" if args.per_seed else row
            cells.setdefault((table_, row, col), []).append(value)
    text, out = report(cells, args, (time.time() - t0) / 60), args.out or default_out
    if out:
        ev.atomic_write(out, lambda f: f.write((text + "\n").encode()))
        print(f"wrote {out}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    ev.run_cli(main)
