"""Evaluation around diffgap.py: what train.py, sample.py, the benchmarks and the tests share.

diffgap.py holds the paper (schedule, denoiser, diffusion, the bidirectional training loop) and
the general metrics; this module holds what the commands add around it, in the order a split
is scored:

    1. retrieval scores: contrastive, diffgap, two-way and their blends, each one inner product;
       bootstrap intervals; the choice on validation (choose_score, choice_reason)
    2. the translation cache: every row of a split translated both ways, kept beside the checkpoint
    3. tables and the gallery export (sample.py --export-gallery)
    4. checkpoints: plain dicts of tensors, written atomically and durably
    5. small command-line helpers: one `error:` line and exit status 2 for bad input

Direction 0 is "B->A" (queries from B rank the audio gallery), 1 is "A->B", as in diffgap.py.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import pickle
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

import diffgap as dg
import embed_cache
from embed_cache.base import atomic_write
from diffgap import DiffGAP, DiffGAPConfig, retrieval_metrics_from_embeddings

DIRECTIONS = {0: "B->A", 1: "A->B"}
DIRECTION_CHOICES = ("both", "b2a", "a2b")    # --direction: both ways, B->A only, A->B only
PAIRS = ("audio-video", "audio-text")
SCHEDULES = ("cosine", "linear")
OBJECTIVES = ("eps", "x0", "v")

# Classifier-free guidance scale for the samples whose mean ranks the gallery. Chosen on the
# validation split of synthetic seed 0 among 1-16 and confirmed on held-out seeds 3 and 4
# (results/README.md, "Guidance scale"). Generation keeps guidance 1.
RANK_GUIDANCE = 16.0
# The two-way score's gallery side (each gallery item translated into the query's modality)
# ranks best with milder guidance: on the validation split of both default checkpoints, 8 was
# the best of 1-16 in all four pair-direction cells, 1.0-1.9 R@1 above 16, and it held on a
# held-out seed (results/README.md, "Retrieval: which score").
GALLERY_GUIDANCE = 8.0
# The default run's length floor. 30 epochs of 250 pairs are 120 steps, after which the learned
# scores lose to contrastive by 30 points; 3,000 steps of batch 64 are ~30 s on a 2-core CPU.
MIN_STEPS = 3000


def rank_guidance(model, scale: float) -> float:
    """The retrieval guidance scale, or 1 for a model trained without condition dropout."""
    return scale if model.config.p_uncond > 0 else 1.0


def guidance_words(guidance: float, gallery_guidance: float) -> str:
    """The guidance scales of a retrieval table's title."""
    return f"guidance {guidance:g}" + ("" if gallery_guidance == guidance else f" ({gallery_guidance:g} for two-way galleries)")


# 1. Retrieval scores ---------------------------------------------------------------------------

def bootstrap_interval(values: torch.Tensor, resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of the mean of per-query values (Q,), resampling queries.

    For R@1 the values are each query's hit (rank == 1); for a difference of two scores on the
    same queries, the per-query differences (a paired interval: it cancels query difficulty).
    """
    g = torch.Generator().manual_seed(seed)
    means = values.float().cpu()[torch.randint(0, len(values), (resamples, len(values)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2]))
    return lo.item(), hi.item()


# The scores a gallery can be ranked by, simplest first: a tie on validation goes to
# the simpler one. A blend weighs a learned score against contrastive: (1 - lam) cos(q, g) + lam
# learned(q, g); BLEND_WEIGHTS is the grid of lam that `--score auto` tries.
BLEND_WEIGHTS = (0.25, 0.5, 0.75)


def score_names(same_space: bool = True, weights=BLEND_WEIGHTS) -> list[str]:
    """Every candidate score, simplest first; without a shared space (D_q != D_g) only the learned ones."""
    if not same_space:
        return ["diffgap", "two-way"]
    return (["contrastive", "diffgap"] + [f"blend-{w:g}" for w in weights]
            + ["two-way"] + [f"two-way-blend-{w:g}" for w in weights])


def parse_score(name: str) -> tuple[str, float]:
    """A score's name -> (learned score, lam): "blend-0.25" -> ("diffgap", 0.25), "contrastive" -> ("diffgap", 0)."""
    if name == "contrastive":
        return "diffgap", 0.0
    for learned, prefix in (("two-way", "two-way-blend-"), ("diffgap", "blend-")):
        if name == learned:
            return learned, 1.0
        if name.startswith(prefix):
            try:
                lam = float(name[len(prefix):])
            except ValueError:
                break
            if 0 < lam < 1:
                return learned, lam
    raise ValueError(f"unknown score {name!r}: use contrastive, diffgap, two-way, blend-L or two-way-blend-L "
                     f"with 0 < L < 1")


def query_side(score: str, q: torch.Tensor, g_hat_q: torch.Tensor | None = None) -> torch.Tensor:
    """Query vectors of a score: their inner products with gallery_side's rows rank like the score.

    q (Q, D_q) the queries, g_hat_q (Q, D_g) their translations into the gallery's modality
    (DiffGAP.translate) -> (Q, D_g), or (Q, D_g + D_q) for the two-way scores. With unit vectors,
        diffgap family: (1 - lam) cos(q, g) + lam cos(g_hat_q, g) = <(1 - lam) q + lam g_hat_q, g>
        two-way family: (1 - lam) cos(q, g) + lam/2 [cos(g_hat_q, g) + cos(q, q_hat_g)]
                        = <[(1 - lam) q + lam/2 g_hat_q ; lam/2 q], [g ; q_hat_g]>
    The two-way term cos(q, q_hat_g) translates each gallery item into the query's modality, so
    it looks at p(q | g), the Bayes ranking, which a one-way score never does.
    """
    learned, lam = parse_score(score)
    q = F.normalize(q.float(), dim=-1)
    if lam == 0:
        return q
    w = lam if learned == "diffgap" else lam / 2
    first = w * F.normalize(g_hat_q.float(), dim=-1) + ((1 - lam) * q if lam < 1 else 0)
    return first if learned == "diffgap" else torch.cat([first, w * q], dim=1)


def gallery_side(score: str, g: torch.Tensor, q_hat_g: torch.Tensor | None = None) -> torch.Tensor:
    """Unit gallery vectors of a score (see query_side): g (G, D_g) and, for two-way, its
    translations q_hat_g (G, D_q) into the query's modality -> (G, D_g) or (G, D_g + D_q).
    [g ; q_hat_g] of unit halves is scaled by 1/sqrt(2): every score shrinks alike, the ranking stays."""
    g = F.normalize(g.float(), dim=-1)
    if parse_score(score)[0] == "diffgap":
        return g
    return torch.cat([g, F.normalize(q_hat_g.float(), dim=-1)], dim=1) / math.sqrt(2)


@torch.no_grad()
def score_retrieval(queries: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor, g_hat_q: torch.Tensor,
                    q_hat_g: torch.Tensor | None = None, scores: list[str] | None = None) -> dict[str, dict]:
    """{score: retrieval metrics} for each score (default: all of score_names the inputs allow).

    queries (Q, D_q), gallery (G, D_g), relevant as in retrieval_metrics; g_hat_q (Q, D_g) the
    queries translated, q_hat_g (G, D_q) the gallery translated the other way (None: no two-way).
    Each metrics dict also holds "R@1 lo"/"R@1 hi", a 95% bootstrap interval over queries, and
    "gain", "gain lo"/"gain hi", the R@1 gain over contrastive with its paired interval, and
    "gain lo adjusted", the lower end of that interval at the level that keeps the chance of any
    of the m learned candidates looking better by luck at 5% (1 - 0.05 / m, Bonferroni), which
    choose_score uses.
    """
    for x, what in ((queries, "query"), (gallery, "gallery"), (g_hat_q, "query translation"),
                    (q_hat_g, "gallery translation")):
        if x is not None:
            dg.check_finite(x, what)
    if scores is None:
        scores = [s for s in score_names(queries.shape[1] == gallery.shape[1]) if q_hat_g is not None or "two-way" not in s]
    ranked = {s: retrieval_metrics_from_embeddings(query_side(s, queries, g_hat_q), gallery_side(s, gallery, q_hat_g),
                                                   relevant, return_ranks=True) for s in scores}
    learned = len(ranked) - 1
    for name, (metrics, ranks) in ranked.items():
        metrics["R@1 lo"], metrics["R@1 hi"] = bootstrap_interval((ranks == 1).float())
        if "contrastive" in ranked and name != "contrastive":
            gain = (ranks == 1).float() - (ranked["contrastive"][1] == 1).float()
            metrics["gain"], (metrics["gain lo"], metrics["gain hi"]) = gain.mean().item(), bootstrap_interval(gain)
            metrics["gain lo adjusted"] = bootstrap_interval(gain, level=1 - 0.05 / learned)[0]
    return {name: metrics for name, (metrics, _) in ranked.items()}


@torch.no_grad()
def query_vectors(model: DiffGAP, queries: torch.Tensor, direction: int, score: str, num_samples: int = 16,
                  **sample_kw) -> torch.Tensor:
    """The query side of `score` for new queries (Q, D_q) -> (Q, D'): their inner products with
    the gallery vectors sample.py --export-gallery writes rank like the score. The same settings
    as the export (its index.json) give the same ranking; sample_kw as in sample()."""
    g_hat_q = model.translate(queries, direction, num_samples, **sample_kw) if parse_score(score)[1] > 0 else None
    return query_side(score, queries, g_hat_q)


def choose_score(val_results: dict[str, dict]) -> str:
    """The score to rank new data by, from score_retrieval's results on the validation split.

    A learned score replaces contrastive only when its R@1 gain over contrastive is beyond
    noise: the lower end of its paired bootstrap interval, adjusted for the number of
    candidates ("gain lo adjusted"), is above zero. Among those, and contrastive, the best
    validation R@1 wins, the simpler on a tie (score_names' order). Taking the plain maximum
    would pick a winner of noise on a small validation split: a +1.9 point "gain" from two
    queries that was 4.8 points below contrastive on test. Without contrastive among the
    results (unequal dims) the best R@1 wins.
    """
    if "contrastive" in val_results:
        val_results = {name: m for name, m in val_results.items()
                       if name == "contrastive" or m.get("gain lo adjusted", 0.0) > 0}
    return max(val_results, key=lambda name: val_results[name]["R@1"])


def choice_reason(val_results: dict[str, dict], chosen: str) -> str:
    """Why choose_score chose `chosen`, in words for a table's legend (gains in R@1 points)."""
    if "contrastive" not in val_results:
        return "the best validation R@1 (no contrastive score: the dims differ)"
    learned = {n: m for n, m in val_results.items() if n != "contrastive"}
    if chosen != "contrastive":
        m = learned[chosen]
        return (f"{100 * m['gain']:+.1f} over contrastive on validation, beyond noise (adjusted lower bound "
                f"{100 * m['gain lo adjusted']:+.1f} > 0 with {len(learned)} candidates)")
    if not learned:
        return "the only candidate"
    best = max(learned, key=lambda n: learned[n]["R@1"])
    m = learned[best]
    return (f"no learned score's validation gain is beyond noise (best: {best} {100 * m['gain']:+.1f}, adjusted lower "
            f"bound {100 * m['gain lo adjusted']:+.1f} with {len(learned)} candidates)")


# 2. The translation cache ---------------------------------------------------------------------

def translate_split(model: dg.DiffGAP, split, num_samples: int, steps: int = 5, sampler: str = "ddim",
                    eta: float = 0.0, guidance: float = 1.0, seed: int = 0,
                    gallery_guidance: float | None = None) -> dict[str, torch.Tensor]:
    """{"b2a": (N_b, D_A), "a2b": (N_a, D_B)}: every row of a split translated into the other
    modality (the mean of num_samples samples, DiffGAP.translate), on the CPU. Each direction
    draws from its own generator seeded by (seed, direction). With a gallery_guidance other than
    guidance, also "b2a_gallery" and "a2b_gallery": the same rows translated with that guidance,
    for the gallery side of the two-way scores (split_scores)."""
    device = next(model.parameters()).device
    rows = {name: (x[:] if isinstance(x, embed_cache.Rows) else x).to(device)   # read once, used at every scale
            for name, x in (("b2a", split.b), ("a2b", split.a))}
    scales = {"": guidance} if gallery_guidance in (None, guidance) else {"": guidance, "_gallery": gallery_guidance}
    out = {}
    for suffix, scale in scales.items():
        for direction, (name, x) in enumerate(rows.items()):
            g = torch.Generator(device=device).manual_seed(dg.derived_seed(seed, "translate", direction))
            out[name + suffix] = model.translate(x, direction, num_samples, steps=steps, sampler=sampler, eta=eta,
                                                 guidance=scale, generator=g).cpu()
    return out


def split_translations(model: dg.DiffGAP, split, split_name: str, ckpt_path: str, num_samples: int, steps: int = 5,
                       sampler: str = "ddim", eta: float = 0.0, guidance: float = 1.0, seed: int = 0,
                       gallery_guidance: float | None = None, say=print) -> dict[str, torch.Tensor]:
    """Every row of a split translated into the other modality, cached beside the checkpoint.

    Returns translate_split's dict: {"b2a": (N_b, D_A), "a2b": (N_a, D_B)}, the mean of
    num_samples samples per row (DiffGAP.translate), and, with a gallery_guidance other than
    guidance, the same at that scale ("b2a_gallery", "a2b_gallery"); every score of both
    directions follows from them (query side and, for two-way, gallery side). The file
    CKPT_STEM.<split>-translations.npz is reused while the checkpoint's bytes, the split's
    embeddings and these settings are unchanged, and rebuilt otherwise; a cached and a rebuilt
    translation are the same numbers.
    """
    a, b = (x[:] if isinstance(x, embed_cache.Rows) else x for x in (split.a, split.b))
    device = next(model.parameters()).device
    gallery_guidance = None if gallery_guidance == guidance else gallery_guidance
    settings = dict(num_samples=num_samples, steps=steps, sampler=sampler, eta=eta, guidance=guidance, seed=seed,
                    gallery_guidance=gallery_guidance, device=device.type, kernels=dg.KERNELS)
    digest = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=16)
    with open(ckpt_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    for x in (a, b, split.b_to_a):
        digest.update(x.contiguous().numpy().tobytes())
    key, path = digest.hexdigest(), os.path.splitext(ckpt_path)[0] + f".{split_name}-translations.npz"
    suffixes = ("",) if gallery_guidance is None else ("", "_gallery")
    shapes = {name + suffix: shape for name, shape in (("b2a", (len(b), a.shape[1])), ("a2b", (len(a), b.shape[1])))
              for suffix in suffixes}
    try:
        with np.load(path) as z:
            if str(z["key"]) == key and all(z[name].shape == shape for name, shape in shapes.items()):
                say(f"{split_name} translations: reused {path}")
                return {name: torch.from_numpy(z[name]) for name in shapes}
    except FileNotFoundError:
        pass
    except Exception as e:   # unreadable or from an older layout: rebuild it
        say(f"{split_name} translations: {path} is unreadable ({type(e).__name__}), rebuilding")
    samples = num_samples * (len(a) + len(b)) * len(suffixes)
    again = "" if gallery_guidance is None else f" and again at {gallery_guidance:g} for two-way galleries"
    say(f"{split_name} translations: building (K={num_samples} samples for each of {len(a) + len(b)} rows, {steps} "
        f"{sampler} steps, guidance {guidance:g}{again}: {samples:,} samples), once per checkpoint and split")
    t0 = time.perf_counter()
    out = translate_split(model, embed_cache.Split(a=a, b=b, b_to_a=split.b_to_a), num_samples, steps, sampler, eta,
                          guidance, seed, gallery_guidance)   # the rows already read, not read again from a memmap
    secs = time.perf_counter() - t0
    atomic_write(path, lambda f: np.savez(f, key=np.array(key), **{k: v.numpy() for k, v in out.items()}))
    say(f"{split_name} translations: built in {secs:.1f} s ({samples / secs:,.0f} samples/s), saved to {path}")
    return out


def gallery_translations(translations: dict, direction: int) -> torch.Tensor:
    """The gallery side of a direction's two-way scores from split_translations' output: the
    gallery translated the other way, at the gallery guidance when that was built apart."""
    name = "a2b" if direction == 0 else "b2a"
    return translations.get(name + "_gallery", translations[name])


def split_scores(split, direction: int, translations: dict, scores=None) -> dict[str, dict]:
    """dg.score_retrieval for one direction of a split, from split_translations' output."""
    q, gal, rel = split.retrieval(direction)
    g_hat_q = translations["b2a" if direction == 0 else "a2b"]
    return score_retrieval(q, gal, rel, g_hat_q, gallery_translations(translations, direction), scores)


# 3. Tables and the gallery export --------------------------------------------------------------

MEDR_LEGEND = ("medR: median of the 1-based ranks of each query's best correct item, the mean of the middle two for an "
               "even count (as CLIP4Clip);\n      LAION-CLAP's and open_clip's evaluation print floor(median of 0-based "
               "ranks) + 1 instead (1, not 1.5, for ranks 1, 1, 2, 3).")


def retrieval_table(results: dict, title: str, chosen: dict | None = None) -> str:
    """results: {direction: {score name: metrics}} -> a small aligned text table.

    Brackets hold 95% bootstrap intervals over queries (dg.score_retrieval) where present: of
    R@1, and of the paired R@1 gain over contrastive on the same queries. A "val R@1" entry
    gets its own column; chosen {direction: score} marks those rows with "*".
    """
    pct = lambda m, key: f"[{100 * m[key + ' lo']:.1f}, {100 * m[key + ' hi']:.1f}]" if key + " lo" in m else ""
    val = any("val R@1" in m for by_score in results.values() for m in by_score.values())
    width = max(len(name) for by_score in results.values() for name in by_score) + 3
    lines = [title, f"{'direction':<10}{'score':<{width}}" + (f"{'val R@1':>8}" if val else "") +
             f"{'R@1':>7} {'95% CI':<14}{'R@5':>6}{'R@10':>7}{'mAP@10':>8}{'medR':>6}  R@1 gain over contrastive"]
    for d, by_score in results.items():
        for name, m in by_score.items():
            mark = " *" if chosen and chosen.get(d) == name else ""
            gain = f"{100 * m['gain']:+5.1f} {pct(m, 'gain')}" if "gain" in m else ""
            lines.append(f"{DIRECTIONS[d]:<10}{name + mark:<{width}}" + (f"{100 * m['val R@1']:8.1f}" if "val R@1" in m else " " * 8 * val) +
                         f"{100 * m['R@1']:7.1f} {pct(m, 'R@1'):<14}{100 * m['R@5']:6.1f}{100 * m['R@10']:7.1f}"
                         f"{100 * m['mAP@10']:8.1f}{m['median_rank']:6g}  {gain}".rstrip())
    lines.append(MEDR_LEGEND)
    return "\n".join(lines)


def export_gallery(folder: str, split, direction: int, score: str, translations: dict, info: dict) -> None:
    """DIR/<b2a|a2b>.gallery.npy (G, D') unit rows of the score's gallery side, .ids.txt one id per
    row, and index.json: what a query needs to be scored against them (diffgap.query_vectors)."""
    _, gal, _ = split.retrieval(direction)
    name = ("b2a", "a2b")[direction]
    os.makedirs(folder, exist_ok=True)
    save_npy(os.path.join(folder, f"{name}.gallery.npy"),
             gallery_side(score, gal, gallery_translations(translations, direction)))
    ids = (split.a_ids if direction == 0 else split.b_ids) or [str(i) for i in range(len(gal))]
    atomic_write(os.path.join(folder, f"{name}.ids.txt"), lambda f: f.write("".join(f"{i}\n" for i in ids).encode()))
    path = os.path.join(folder, "index.json")
    entries = {}
    if os.path.exists(path):   # the other direction's entry, from this or an earlier export
        try:
            with open(path) as f:
                entries = json.load(f)
        except ValueError:   # not JSON, or not text
            entries = None
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: not an index.json written by --export-gallery; move it away or export to "
                             f"another folder")
    entries[name] = dict(info, score=score, direction=direction, rows=len(gal),
                         query=f"diffgap.query_vectors(model, queries, {direction}, {score!r}, "
                               f"num_samples={info['num_samples']}, steps={info['steps']}, guidance={info['guidance']:g})")
    atomic_write(path, lambda f: f.write(json.dumps(entries, indent=1).encode()))
    print(f"exported {name}: {len(gal)} gallery rows of the {score} score to {folder}/{name}.gallery.npy (+ ids, index.json)")


# 4. Checkpoints: plain dicts of tensors and Python types, written atomically -------------------

def save_checkpoint(path: str, model: DiffGAP, **extra) -> None:
    """Write {"config", "model", **extra} to path atomically and durably (atomic_write)."""
    state = {"config": asdict(model.config), "model": model.state_dict(), **extra}
    atomic_write(path, lambda f: torch.save(state, f))


def _is_int(v, lo: int) -> bool:
    return type(v) is int and v >= lo


def _one_of(choices: tuple) -> tuple:
    names = [repr(c) for c in choices]
    return lambda v: v in choices, ", ".join(names[:-1]) + " or " + names[-1]


_flag = (lambda v: type(v) is bool, "True or False")


# What train.py keeps beside the weights, and what each value must be. A checkpoint is user
# input (hand-edited, written by other code): a wrong entry is one line naming the file here,
# not a KeyError or TypeError deep inside a command.
CHECKPOINT_ENTRIES = {
    "step": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "pair": _one_of(PAIRS),
    "data": (lambda v: isinstance(v, str) and v != "", "a data spec (a non-empty string)"),
    "epochs": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "lr": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "seed": (lambda v: _is_int(v, -2**63), "an integer"),
    "direction": _one_of(DIRECTION_CHOICES),
    "compile": _flag,
    "optimizer": (lambda v: isinstance(v, dict) and {"state", "param_groups"} <= v.keys(), "an optimizer state dict"),
}


_size = (lambda v: _is_int(v, 1), "an integer >= 1")
_fraction = (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)")
# What a checkpoint's config may hold: values that fail later (switch_every 0 divides by zero,
# an odd time_dim drops a feature) are refused where the file is read.
CONFIG_ENTRIES = {
    **dict.fromkeys(("dim_a", "dim_b", "hidden", "inner", "depth", "timesteps", "switch_every"), _size),
    "time_dim": (lambda v: _is_int(v, 2) and v % 2 == 0, "an even integer >= 2"),
    "schedule": _one_of(SCHEDULES), "objective": _one_of(OBJECTIVES),
    "p_uncond": _fraction, "ema_decay": _fraction,
    "direction_embedding": _flag, "center": _flag,
}


def config_problem(config) -> str:
    """'' if config (a dict of DiffGAPConfig fields) can train, else what is wrong with it."""
    if not isinstance(config, dict):
        return f"config is {type(config).__name__}, not a dict"
    for key, value in config.items():
        if key not in CONFIG_ENTRIES:
            return f"config has a field {key!r} that DiffGAPConfig does not"
        valid, expected = CONFIG_ENTRIES[key]
        if not valid(value):
            return f"config entry {key!r} is {value!r}"[:120] + f"; expected {expected}"
    return ""


def load_checkpoint(path: str, map_location="cpu", needs: tuple[str, ...] = ()) -> tuple[DiffGAP, dict]:
    """Rebuild the model from a checkpoint: (model, the checkpoint's dict).

    The config is checked (CONFIG_ENTRIES), every entry of CHECKPOINT_ENTRIES that is present
    too, and those named in `needs` must be present. Raises FileNotFoundError if there is no
    file, ValueError naming the file if it is unreadable, the config cannot train, the weights
    do not fit it, an entry is missing or wrong, or a weight is not finite."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():   # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        problem = config_problem(ckpt["config"])
        if not problem:
            model = DiffGAP(DiffGAPConfig(**ckpt["config"]))
            model.load_state_dict(ckpt["model"])
    except pickle.UnpicklingError:   # torch's own message suggests weights_only=False, which would run code
        raise ValueError(f"{path}: not a diffgap checkpoint: torch.load(weights_only=True) cannot read it (not a "
                         f"torch.save file of tensors and plain data); nothing in it was run") from None
    except Exception as e:  # truncated zip, no config, wrong keys, wrong shapes: all mean "not usable"
        raise ValueError(f"{path}: not a usable diffgap checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if problem:
        raise ValueError(f"{path}: {problem}")
    for key, (valid, expected) in CHECKPOINT_ENTRIES.items():
        if key not in ckpt:
            if key in needs:
                raise ValueError(f"{path}: no {key!r} entry, which this command needs (train.py writes it)")
        elif not valid(ckpt[key]):
            shown = repr(ckpt[key]) if not isinstance(ckpt[key], dict) else "a dict without 'state' and 'param_groups'"
            raise ValueError(f"{path}: entry {key!r} is {shown[:80]}; expected {expected}")
    bad = non_finite(model.state_dict())
    if bad:
        raise ValueError(f"{path}: {bad} (a diverged run): retrain, e.g. with a lower learning rate")
    return model, ckpt


def non_finite(tensors: dict) -> str:
    """'' if every floating-point tensor of a state dict is finite, else which and how many are not."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()}
    bad = {k: n for k, n in counts.items() if n}
    if not bad:
        return ""
    total = sum(v.numel() for k, v in tensors.items() if k in counts)
    return f"{sum(bad.values()):,} of {total:,} values are not finite (first: {next(iter(bad))})"


# 5. Command-line helpers ----------------------------------------------------------------------

class ArgParser(argparse.ArgumentParser):
    """argparse with the project's error format: one `error:` line on stderr, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def number(kind=float, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """An argparse type: a finite `kind` (int or float) in the range lo..hi (ends excluded if *_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        bounds = ([f"{'>' if lo_open else '>='} {lo:g}"] if lo > -math.inf else []) + \
                 ([f"{'<' if hi_open else '<='} {hi:g}"] if hi < math.inf else [])
        inside = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be finite{', ' if bounds else ''}{' and '.join(bounds)}; got {text}")
        return value
    return parse


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def set_kernels(name: str, device: torch.device) -> None:
    """--kernels NAME as diffgap.KERNELS; "triton" off CUDA needs Triton's interpreter, which must be
    chosen before triton is imported (TRITON_INTERPRET=1 in the environment), so it is refused here."""
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernels triton without CUDA runs Triton's interpreter (slow, for debugging): start the "
                         "command with TRITON_INTERPRET=1 in its environment")
    dg.KERNELS = name


def check_dims(data: embed_cache.Dataset, model: dg.DiffGAP) -> None:
    """A checkpoint only fits data of the dims it was trained on."""
    if data.dims != (model.config.dim_a, model.config.dim_b):
        raise ValueError(f"{data.spec}: dims {data.dims[0]}/{data.dims[1]} do not match the checkpoint's "
                         f"{model.config.dim_a}/{model.config.dim_b}")


def find_checkpoint(path: str | None) -> str:
    if path:
        return path
    found = glob.glob(os.path.join("runs", "**", "*.pt"), recursive=True)
    if not found:
        raise FileNotFoundError("no checkpoint under runs/: train one first, e.g. python train.py --pair audio-video")
    return max(found, key=os.path.getmtime)


def save_npy(path: str, x: torch.Tensor) -> None:
    """Write x as float32 .npy atomically and durably (atomic_write)."""
    atomic_write(path, lambda f: np.save(f, x.cpu().numpy().astype(np.float32)))


def run_cli(main) -> None:
    """Run a command's main(): bad input becomes one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except (embed_cache.DataError, ValueError, OSError) as e:   # OSError: FileNotFoundError, disk full, ...
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # outside training's own handler (loading data, evaluating)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
