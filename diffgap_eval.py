"""What the commands, benchmarks and tests add around diffgap.py (the paper), in the order a split is
scored: 1. metrics, 2. retrieval scores (each one inner product) and their choice on validation,
3. split translation, 4. tables and the gallery export, 5. checkpoints, 6. command-line helpers.
Direction 0 is "B->A" (queries from B rank the audio gallery), 1 is "A->B", as in diffgap.py."""
from __future__ import annotations

import argparse
import glob
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
from diffgap import DiffGAP, DiffGAPConfig
from embed_cache.base import atomic_write, pick_device, reason  # noqa: F401 (pick_device: the commands' device)

try:
    from kernels import cosine_topk
except ImportError:   # pip-installed, the package is diffgap_kernels (PyPI's `kernels` is another project)
    from diffgap_kernels import cosine_topk

DIRECTION_CHOICES = ("both", "b2a", "a2b")    # --direction: both ways, B->A (0) only, A->B (1) only; file names
DIRECTIONS = {d: DIRECTION_CHOICES[1 + d].upper().replace("2", "->") for d in (0, 1)}   # tables: B->A, A->B
PAIRS = ("audio-video", "audio-text")

# Guidance of the samples whose mean ranks the gallery (generation keeps 1), and of two-way's
# gallery side: the best of 1-16 on validation, confirmed on held-out seeds (results/README.md).
RANK_GUIDANCE = 16.0
GALLERY_GUIDANCE = 8.0
# The default run's length floor: 30 epochs of 250 pairs are 120 steps, after which the learned
# scores lose to contrastive by 30 points.
MIN_STEPS = 3000


def direction_arg(name: str) -> int | None:
    """--direction both | b2a | a2b -> None (both) | 0 | 1, as diffgap.train_steps takes it."""
    return None if name == "both" else DIRECTION_CHOICES.index(name) - 1


def rank_guidance(model, scale: float) -> float:
    """The retrieval guidance scale, or 1 for a model trained without condition dropout."""
    return scale if model.config.p_uncond > 0 else 1.0


def guidance_words(guidance: float, gallery_guidance: float) -> str:
    """The guidance scales of a retrieval table's title."""
    return f"guidance {guidance:g}" + ("" if gallery_guidance == guidance else f" ({gallery_guidance:g} for two-way galleries)")


# 1. Metrics ------------------------------------------------------------------------------------

def check_finite(x: torch.Tensor, what: str, offset: int = 0) -> None:
    """Raise ValueError naming the first non-finite row of x (N, D) or (N,), counted from offset.
    A NaN compares false with everything: unchecked, it silently reorders every query's ranking."""
    bad = ~torch.isfinite(x) if x.dim() < 2 else ~torch.isfinite(x).all(dim=-1)
    if bad.any():
        raise ValueError(f"{what} row {offset + int(bad.nonzero()[0, 0])} is not finite ({int(bad.sum())} rows)")


def _unit_rows(x: torch.Tensor, what: str, offset: int = 0) -> torch.Tensor:
    check_finite(x, what, offset)
    return F.normalize(x.float(), dim=-1)


def cosine_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (Q, D) x (G, D) -> (Q, G); a non-finite row is a ValueError."""
    return _unit_rows(queries, "query") @ _unit_rows(gallery, "gallery").T


def relevant_keys(relevant: torch.Tensor, Q: int, G: int) -> torch.Tensor:
    """The correct (query, gallery item) pairs as sorted unique keys query * G + item (P,) int64, from relevant
    as (Q,) int labels (one correct item each), a (Q, G) bool mask, or (P, 2) int pairs (what a split gives:
    memory grows with the pairs, never with Q x G). Every query needs a correct item; else ValueError."""
    if Q == 0 or G == 0:
        raise ValueError(f"nothing to rank: {Q} queries and {G} gallery items")
    shapes = {(Q, G)} if relevant.dtype == torch.bool else {(Q,), (len(relevant), 2)}
    if tuple(relevant.shape) not in shapes:
        raise ValueError(f"relevant has shape {tuple(relevant.shape)}: expected ({Q},) labels, a ({Q}, {G}) bool "
                         f"mask or (P, 2) pairs for {Q} queries x {G} items")
    pairs = relevant.nonzero() if relevant.dtype == torch.bool else relevant.long() if relevant.dim() == 2 else \
        torch.stack([torch.arange(Q, device=relevant.device), relevant.long()], 1)
    if len(pairs) and not (0 <= int(pairs.min()) and int(pairs[:, 0].max()) < Q and int(pairs[:, 1].max()) < G):
        raise ValueError(f"relevant labels must be gallery rows 0..{G - 1} (and pairs' queries 0..{Q - 1})")
    none = (torch.bincount(pairs[:, 0], minlength=Q) == 0).nonzero()
    if len(none):
        raise ValueError(f"query {int(none[0, 0])} has no relevant gallery item")
    return torch.unique(pairs[:, 0] * G + pairs[:, 1])


def _median(x: torch.Tensor) -> float:
    """numpy.median of a 1-d tensor of any length (torch.quantile refuses more than 2^24 values)."""
    x = x.double().sort().values
    return ((x[(len(x) - 1) // 2] + x[len(x) // 2]) / 2).item()


def _metrics(first: torch.Tensor, ap: torch.Tensor, ks) -> dict[str, float]:
    """The metrics of one ordering from first (Q,), the 1-based rank of each query's best correct item, and
    ap (Q,), each query's AP@10 = sum_{k<=10} P@k rel_k / min(n_rel, 10), which never exceeds 1.

    median_rank is the median of the 1-based ranks, the mean of the two middle ones for an even
    count (numpy.median, as CLIP4Clip reports it); LAION-CLAP's and open_clip's evaluation print
    floor(median of 0-based ranks) + 1 instead, which is 1 where this gives 1.5 for ranks 1, 1, 2, 3.
    """
    out = {f"R@{k}": (first <= k).float().mean().item() for k in ks}
    out["median_rank"] = _median(first)
    out["mAP@10"] = ap.mean().item()
    return out


def _ap10(top_hits: torch.Tensor, n_rel: torch.Tensor) -> torch.Tensor:
    """(Q,) AP@10 from top_hits (Q, <=10) bool, the relevance of each query's top-ranked items, and n_rel (Q,)."""
    hits = top_hits.float()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1, device=hits.device)
    return (precision * hits).sum(1) / n_rel.clamp(max=10)


def retrieval_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks=(1, 5, 10), return_ranks: bool = False):
    """R@k, median rank and mAP@10 (conventions: _metrics) from scores (Q, G), higher is better, ties to the
    lower index; relevant as relevant_keys takes it (several correct items: a hit at k when any is in the top
    k). return_ranks also returns first (Q,), as _metrics has it. A non-finite score is a ValueError."""
    Q, G = scores.shape
    check_finite(scores, "scores")
    mask = torch.zeros(Q * G, dtype=torch.bool, device=scores.device)
    mask[relevant_keys(relevant, Q, G)] = True
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices   # (Q, G)
    hits = mask.view(Q, G).gather(1, order)                                  # (Q, G) rel at each rank
    first = hits.float().argmax(1) + 1
    out = _metrics(first, _ap10(hits[:, :10], hits.sum(1)), ks)
    return (out, first) if return_ranks else out


@torch.no_grad()
def retrieval_metrics_from_embeddings(queries: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor,
                                      ks=(1, 5, 10), chunk: int = 8192, query_chunk: int = 4096,
                                      return_ranks: bool = False):
    """retrieval_metrics(cosine_scores(queries, gallery), relevant) without the (Q, G) score matrix: queries (Q, D),
    gallery (G, D); memory grows with query_chunk x chunk, not with Q or G. The top 10 of each block of queries
    comes from kernels.cosine_topk (Triton on CUDA, chunked torch elsewhere; ties to the lower index) and gives R@k
    (k <= 10) and mAP@10; a query without a correct item in it is ranked past 10 by counting, over gallery chunks,
    the items that beat its best correct item. A non-finite row is a ValueError."""
    Q, G = queries.shape[0], gallery.shape[0]
    keys = relevant_keys(relevant, Q, G).to(queries.device)
    for start in range(0, max(Q, G), chunk):
        check_finite(queries[start:start + chunk], "query", start)
        check_finite(gallery[start:start + chunk], "gallery", start)
    k10, first, ap = min(10, G), [], []
    for s in range(0, Q, query_chunk):
        q = queries[s:s + query_chunk]
        lo, hi = torch.searchsorted(keys, torch.tensor([s, s + len(q)], device=keys.device) * G).tolist()
        mine = keys[lo:hi] - s * G                     # this block's correct pairs: row * G + item
        _, top_i = cosine_topk(q, gallery, k10, backend=dg.KERNELS, strict=dg.KERNELS == "triton")
        top_hits = torch.isin(torch.arange(len(q), device=q.device)[:, None] * G + top_i, mine)   # (n, k10)
        in_top = top_hits.any(1)
        rank = torch.where(in_top, top_hits.float().argmax(1) + 1, 0)
        miss = (~in_top).nonzero()[:, 0]
        if len(miss):   # their correct pairs, as (row among the misses, item)
            row = torch.full((len(q),), -1, dtype=torch.long, device=q.device)
            row[miss] = torch.arange(len(miss), device=q.device)
            r = row[mine // G]
            rank[miss] = _ranks_past_top(q[miss], gallery, r[r >= 0], mine[r >= 0] % G, chunk).clamp(min=k10 + 1)
        first.append(rank)
        ap.append(_ap10(top_hits, torch.bincount(mine // G, minlength=len(q))))
    first = torch.cat(first)
    out = _metrics(first, torch.cat(ap), ks)
    return (out, first) if return_ranks else out


def _ranks_past_top(q: torch.Tensor, gallery: torch.Tensor, r: torch.Tensor, item: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """(m,) 1-based rank of the best correct item (the lowest index among ties) of each query q (m, D), its
    correct pairs (r[j], item[j]): 1 + the gallery items that beat it, counted over gallery chunks."""
    G, q = len(gallery), F.normalize(q.float(), dim=-1)

    def scored():   # (start, scores (m, n), whether each is a correct pair)
        for start in range(0, G, chunk):
            s = q @ F.normalize(gallery[start:start + chunk].float(), dim=-1).T
            at = (item >= start) & (item < start + s.shape[1])
            ok = torch.zeros_like(s, dtype=torch.bool)
            ok[r[at], item[at] - start] = True
            yield start, s, ok
    best_s = torch.full((len(q),), float("-inf"), device=q.device)
    best_i = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for start, s, ok in scored():
        v, i = torch.where(ok, s, float("-inf")).max(1)
        take = v > best_s
        best_s, best_i = torch.where(take, v, best_s), torch.where(take, start + i, best_i)
    count = torch.ones(len(q), dtype=torch.long, device=q.device)
    for start, s, _ in scored():
        idx = torch.arange(start, start + s.shape[1], device=q.device)
        count += ((s > best_s[:, None]) | ((s == best_s[:, None]) & (idx < best_i[:, None]))).sum(1)
    return count


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to x (N, D) and y (M, D), in float64:
    |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2), symmetric eigendecompositions only."""
    if min(len(x), len(y)) < 2:   # a covariance needs two rows
        raise ValueError(f"the Frechet distance needs at least 2 rows in each set, got {len(x)} and {len(y)}")
    check_finite(x, "first set")
    check_finite(y, "second set")
    x, y = x.double(), y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)
    w, V = torch.linalg.eigh(s_x)
    sqrt_sx = (V * w.clamp(min=0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(sqrt_sx @ s_y @ sqrt_sx).clamp(min=0).sqrt().sum()
    return ((mu_x - mu_y).pow(2).sum() + s_x.trace() + s_y.trace() - 2 * cross).item()


def paired_cosine(x: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor) -> float:
    """Mean cosine of each x row (Q, D) with its true pair(s) in gallery (G, D), the mean over its pairs;
    relevant as relevant_keys takes it."""
    x, gallery = _unit_rows(x, "generated"), _unit_rows(gallery, "gallery")
    keys = relevant_keys(relevant, len(x), len(gallery)).to(x.device)
    q, g = keys // len(gallery), keys % len(gallery)
    n = torch.bincount(q, minlength=len(x))
    return ((x * torch.zeros_like(x).index_add_(0, q, gallery[g])).sum(1) / n).mean().item()


# 2. Retrieval scores ---------------------------------------------------------------------------

def bootstrap_interval(values: torch.Tensor, resamples: int = 1000, level: float = 0.95, seed: int = 0,
                       budget: int = 1 << 22):
    """Percentile bootstrap interval of the mean of per-query values (Q,), resampling queries: for R@1
    each query's hit; for two scores, the per-query differences (paired: it cancels query difficulty)."""
    g, v = torch.Generator().manual_seed(seed), values.float().cpu()
    rows = max(1, budget // max(1, len(v)))   # resamples per block: memory stays near budget indices
    means = torch.cat([v[torch.randint(0, len(v), (min(rows, resamples - r), len(v)), generator=g)].mean(1)
                       for r in range(0, resamples, rows)])
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2]))
    return lo.item(), hi.item()


# The scores a gallery can be ranked by, simplest first: a tie on validation goes to the simpler one. A blend
# weighs a learned score against contrastive, (1 - L) cos(q, g) + L learned(q, g); `--score auto` tries L in BLEND_WEIGHTS.
BLEND_WEIGHTS = (0.25, 0.5, 0.75)


def score_names(same_space: bool = True, weights=BLEND_WEIGHTS) -> list[str]:
    """Every candidate score, simplest first; without a shared space (D_q != D_g) only the learned ones."""
    if not same_space:
        return ["diffgap", "two-way"]
    return (["contrastive", "diffgap"] + [f"blend-{w:g}" for w in weights]
            + ["two-way"] + [f"two-way-blend-{w:g}" for w in weights])


def parse_score(name: str) -> tuple[str, float]:
    """A score's name -> (learned score, lam): "blend-0.25" -> ("diffgap", 0.25), "contrastive" -> ("diffgap", 0)."""
    fixed = {"contrastive": ("diffgap", 0.0), "diffgap": ("diffgap", 1.0), "two-way": ("two-way", 1.0)}
    head, _, lam = name.rpartition("blend-")
    try:
        if name in fixed or (head in ("", "two-way-") and 0 < float(lam) < 1):
            return fixed.get(name) or ("two-way" if head else "diffgap", float(lam))
    except ValueError:   # not a number after "blend-"
        pass
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

    queries (Q, D_q), gallery (G, D_g), relevant as in retrieval_metrics; g_hat_q (Q, D_g) and q_hat_g (G, D_q)
    the translations (q_hat_g None: no two-way). Each dict also holds "R@1 lo"/"R@1 hi" (95% bootstrap interval),
    "gain" over contrastive with its paired interval "gain lo"/"gain hi", and "gain lo adjusted": that lower
    end at level 1 - 0.05 / m for the m learned candidates (Bonferroni), which choose_score uses."""
    for x, what in ((queries, "query"), (gallery, "gallery"), (g_hat_q, "query translation"),
                    (q_hat_g, "gallery translation")):
        if x is not None:
            check_finite(x, what)
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
    """The query side of `score` for new queries (Q, D_q) -> (Q, D'), whose inner products with an exported
    gallery rank like the score, given the export's settings (its .index.json; sample_kw as in sample())."""
    g_hat_q = model.translate(queries, direction, num_samples, **sample_kw) if parse_score(score)[1] > 0 else None
    return query_side(score, queries, g_hat_q)


def choose_score(val_results: dict[str, dict]) -> str:
    """The score to rank new data by, from score_retrieval's results on the validation split.

    A learned score replaces contrastive only when its gain is beyond noise ("gain lo adjusted"
    > 0: the plain maximum would pick a winner of noise on a small split); among those and
    contrastive the best R@1 wins, the simpler on a tie (score_names' order). Without
    contrastive (unequal dims) the best R@1 wins.
    """
    if "contrastive" in val_results:
        val_results = {name: m for name, m in val_results.items()
                       if name == "contrastive" or m.get("gain lo adjusted", 0.0) > 0}
    return max(val_results, key=lambda name: val_results[name]["R@1"])


def choice_reason(val_results: dict[str, dict], chosen: str) -> str:
    """Why choose_score chose `chosen`, in words for a table's legend (gains in R@1 points)."""
    learned = {n: m for n, m in val_results.items() if n != "contrastive"}
    if "contrastive" not in val_results or not learned:
        return "the best validation R@1 (no contrastive score: the dims differ)" if learned else "the only candidate"
    best = chosen if chosen != "contrastive" else max(learned, key=lambda n: learned[n]["R@1"])
    m, bound = learned[best], f"adjusted lower bound {100 * learned[best]['gain lo adjusted']:+.1f}"
    if chosen != "contrastive":
        return f"{100 * m['gain']:+.1f} over contrastive on validation, beyond noise ({bound} > 0 with {len(learned)} candidates)"
    return (f"no learned score's validation gain is beyond noise (best: {best} {100 * m['gain']:+.1f}, {bound} with "
            f"{len(learned)} candidates)")


# 3. Every row of a split translated both ways -------------------------------------------------

def translate_split(model: dg.DiffGAP, split, num_samples: int, steps: int = 5, sampler: str = "ddim",
                    eta: float = 0.0, guidance: float = 1.0, seed: int = 0, gallery_guidance: float | None = None,
                    name: str = "split", say=None, lam: float | None = None) -> dict[str, torch.Tensor]:
    """{"b2a": (N_items, D_A), "a2b": (N_a, D_B)}: every item of a split (Split.retrieval) translated into the other modality
    (DiffGAP.translate, lam as there) on the CPU, each direction from a generator seeded by (seed, direction); with
    a gallery_guidance other than guidance also "b2a_gallery", "a2b_gallery" at that guidance, for
    two-way's gallery side. say(line) reports progress (None: silent)."""
    b, a, _ = split.retrieval(0)   # the distinct B items and the audio, each read once
    device = next(model.parameters()).device
    scales = {"": guidance} if gallery_guidance in (None, guidance) else {"": guidance, "_gallery": gallery_guidance}
    samples = num_samples * (len(a) + len(b)) * len(scales)
    t0, out, rows = time.perf_counter(), {}, [x.to(device) for x in (b, a)]
    for suffix, scale in scales.items():
        for direction, x in enumerate(rows):
            g = torch.Generator(device=device).manual_seed(dg.derived_seed(seed, "translate", direction))
            out[DIRECTION_CHOICES[1 + direction] + suffix] = model.translate(
                x, direction, num_samples, steps=steps, sampler=sampler, eta=eta, guidance=scale, generator=g, lam=lam).cpu()
    if say:
        again = f" and again at {gallery_guidance:g} for two-way galleries" if len(scales) > 1 else ""
        say(f"{name} split translated in {time.perf_counter() - t0:.1f} s (K={num_samples} samples for each of "
            f"{len(a) + len(b)} rows, {steps} {sampler} steps, guidance {guidance:g}{again}: {samples:,} samples)")
    return out


# lam: translate()'s weight on the posterior mean against its condition; the first of equal R@1 wins
SHRINK_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)


def fit_shrinkage(model: dg.DiffGAP, split, num_samples: int, **translate_kw) -> dict[str, torch.Tensor]:
    """translate_split(model, split, num_samples, lam=1, **translate_kw), model.lam of each direction set to the
    SHRINK_GRID value with the best diffgap R@1 on it (a validation split; lam stays 1 if D_A != D_B), and
    those translations shrunk as translate() now gives them."""
    out = translate_split(model, split, num_samples, lam=1.0, **translate_kw)
    for d in (0, 1) if model.config.dim_a == model.config.dim_b else ():
        q, g, rel = split.retrieval(d)
        r1 = {lam: retrieval_metrics_from_embeddings(model.toward_condition(out[DIRECTION_CHOICES[1 + d]], q, d, lam),
                                                     g, rel)["R@1"] for lam in SHRINK_GRID}
        model.lam[d] = max(r1, key=r1.get)
    for key, x in out.items() if model.config.dim_a == model.config.dim_b else ():
        d = 0 if key.startswith("b2a") else 1   # "b2a...": the split's B rows translated in direction 0
        out[key] = model.toward_condition(x, split.retrieval(d)[0], d, float(model.lam[d]))
    return out


def gallery_translations(translations: dict, direction: int) -> torch.Tensor:
    """Two-way's gallery side: the gallery translated the other way, at its own guidance when built apart."""
    other = DIRECTION_CHOICES[2 - direction]
    return translations.get(other + "_gallery", translations[other])


def split_scores(split, direction: int, translations: dict, scores=None) -> dict[str, dict]:
    """score_retrieval for one direction of a split, from translate_split's output."""
    q, gal, rel = split.retrieval(direction)
    return score_retrieval(q, gal, rel, translations[DIRECTION_CHOICES[1 + direction]],
                           gallery_translations(translations, direction), scores)


# 4. Tables and the gallery export --------------------------------------------------------------

MEDR_LEGEND = ("medR: median of the 1-based ranks of each query's best correct item, the mean of the middle two for an "
               "even count (as CLIP4Clip);\n      LAION-CLAP's and open_clip's evaluation print floor(median of 0-based "
               "ranks) + 1 instead (1, not 1.5, for ranks 1, 1, 2, 3).")


def retrieval_table(results: dict, title: str, chosen: dict | None = None) -> str:
    """results {direction: {score: metrics}} -> an aligned text table: 95% bootstrap intervals of R@1 and
    of the paired gain over contrastive where present, a "val R@1" column, "*" on chosen {direction: score}."""
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
    row, and .index.json: what a query needs to be scored against them (query_vectors)."""
    _, gal, _ = split.retrieval(direction)
    name = os.path.join(folder, DIRECTION_CHOICES[1 + direction])
    save_npy(f"{name}.gallery.npy", gallery_side(score, gal, gallery_translations(translations, direction)))
    ids = split.a_ids if direction == 0 else split.b_ids and [split.b_ids[i] for i in split.b_rows()]
    ids = ids or [str(i) for i in range(len(gal))]
    atomic_write(f"{name}.ids.txt", lambda f: f.write("".join(f"{i}\n" for i in ids).encode()))
    entry = dict(info, score=score, direction=direction, rows=len(gal),
                 query=f"diffgap_eval.query_vectors(model, queries, {direction}, {score!r}, "
                       f"num_samples={info['num_samples']}, steps={info['steps']}, guidance={info['guidance']:g})")
    atomic_write(f"{name}.index.json", lambda f: f.write(json.dumps(entry, indent=1).encode()))
    print(f"exported {len(gal)} gallery rows of the {score} score to {name}.gallery.npy (+ .ids.txt, .index.json)")


# 5. Checkpoints: {"config", "model", "step", "optimizer", "run"}, plain tensors and Python types -

_count = lambda v, lo: type(v) is int and v >= lo
# What train.py keeps in a checkpoint's "run" entry and what each value must be. A checkpoint is user input
# (hand-edited, written by other code): a wrong entry is one line naming the file, not a KeyError deep inside.
RUN_ENTRIES = {
    "pair": (lambda v: v in PAIRS, " or ".join(PAIRS)),
    "data": (lambda v: isinstance(v, str) and v != "", "a data spec (a non-empty string)"),
    "epochs": (lambda v: _count(v, 1), "an integer >= 1"),
    "batch_size": (lambda v: _count(v, 1), "an integer >= 1"),
    "lr": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "seed": (lambda v: type(v) is int, "an integer"),
    "direction": (lambda v: v in DIRECTION_CHOICES, ", ".join(DIRECTION_CHOICES)),
    "encoder": (lambda v: v is None or isinstance(v, str), "the embedding model's name (a string) or None"),
}


def save_checkpoint(path: str, model: DiffGAP, **extra) -> None:
    """Write {"config", "model", **extra} to path atomically and durably (atomic_write)."""
    state = {"config": asdict(model.config), "model": model.state_dict(), **extra}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, map_location="cpu", needs: tuple[str, ...] = ()) -> tuple[DiffGAP, dict]:
    """(model, the checkpoint's dict), every entry checked: the config (DiffGAPConfig), "step",
    "optimizer" and the RUN_ENTRIES of "run" where present; those in `needs` must be present.
    The earlier layout (run settings at the top level) reads as this one. FileNotFoundError if
    there is no file, else ValueError naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    unusable = lambda why: ValueError(f"{path}: not a usable diffgap checkpoint ({why})")
    try:
        with warnings.catch_warnings():   # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:   # torch's own message suggests weights_only=False, which would run code
        raise ValueError(f"{path}: not a diffgap checkpoint: torch.load(weights_only=True) cannot read it (not a "
                         f"torch.save file of tensors and plain data); nothing in it was run") from None
    except Exception as e:  # a truncated or corrupt zip
        raise unusable(f"truncated or corrupt, {os.path.getsize(path):,} bytes: {reason(e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise unusable("no config dict")
    if "run" not in ckpt:   # the earlier layout: run settings at the top level
        ckpt["run"] = {k: ckpt.pop(k) for k in list(ckpt) if k in RUN_ENTRIES}
        ckpt.pop("compile", None)
        ckpt["config"].pop("center", None)   # always on now; off meant zero means, which load as such
    if isinstance(ckpt.get("model"), dict) and "lam" not in ckpt["model"]:   # written before the fitted shrinkage
        ckpt["config"].setdefault("shrink", False)
        ckpt["model"]["lam"] = torch.ones(2)
    try:
        model = DiffGAP(DiffGAPConfig(**ckpt["config"]))
    except (TypeError, ValueError) as e:   # an unknown field, or a value that cannot train
        raise ValueError(f"{path}: {reason(e) if isinstance(e, TypeError) else e}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # no weights, other keys or shapes
        raise unusable(reason(e)) from None
    run = ckpt["run"] if isinstance(ckpt["run"], dict) else {}
    entries = {"step": (lambda v: _count(v, 0), "an integer >= 0", ckpt),
               "optimizer": (lambda v: isinstance(v, dict) and {"state", "param_groups"} <= v.keys(),
                             "an optimizer state dict", ckpt),
               **{k: (*check, run) for k, check in RUN_ENTRIES.items()}}
    for key, (valid, expected, where) in entries.items():
        if key not in where:
            if key in needs:
                raise ValueError(f"{path}: no {key!r} entry, which this command needs (train.py writes it)")
        elif not valid(where[key]):
            shown = repr(where[key]) if not isinstance(where[key], dict) else "a dict without 'state' and 'param_groups'"
            raise ValueError(f"{path}: entry {key!r} is {shown[:80]}; expected {expected}")
    bad = non_finite(model.state_dict())
    if bad:
        raise ValueError(f"{path}: {bad} (a diverged run): retrain, e.g. with a lower learning rate")
    return model, ckpt


def non_finite(tensors: dict) -> str:
    """'' if every floating-point tensor of a state dict is finite, else which and how many are not."""
    floats = {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()}
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in floats.items() if not torch.isfinite(v).all()}
    return f"{sum(bad.values()):,} of {sum(v.numel() for v in floats.values()):,} values are not finite (first: " \
           f"{next(iter(bad))})" if bad else ""


# 6. Command-line helpers ----------------------------------------------------------------------

class ArgParser(argparse.ArgumentParser):
    """argparse with the project's error format: one `error:` line on stderr, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def arg_type(parse):
    """An argparse type from parse(text): its ValueError's message is the option's one-line error."""
    def checked(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return checked


def number(kind=float, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """An argparse type: a finite `kind` (int or float) in lo..hi (embed_cache.base.number)."""
    return arg_type(lambda text: embed_cache.base.number(text, kind, lo, hi, lo_open, hi_open))


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The options of DiffGAP's sampler that sample.py and generate.py share."""
    p.add_argument("--steps", type=number(int, 1), default=5, help="sampling steps (paper: 50, 20 or 5)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--eta", type=number(float, 0), default=0.0, help="DDIM noise (0: deterministic)")
    p.add_argument("--guidance", type=number(float), default=1.0,
                   help="guidance scale of generated embeddings (sample.py: --cond, FD, paired cos); 1: none")
    p.add_argument("--num-samples", type=number(int, 1), default=16, help="K samples averaged (the diffgap score, --cond)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="auto: Triton kernels on CUDA, torch otherwise; triton on a CPU needs TRITON_INTERPRET=1")
    p.add_argument("--seed", type=number(int, 0), default=0)


def set_kernels(name: str, device: torch.device) -> None:
    """--kernels as diffgap.KERNELS; "triton" off CUDA needs TRITON_INTERPRET=1 set before triton is imported."""
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernels triton without CUDA runs Triton's interpreter (slow, for debugging): start the "
                         "command with TRITON_INTERPRET=1 in its environment")
    dg.KERNELS = name


def check_dims(data: embed_cache.Dataset, model: dg.DiffGAP) -> None:   # a checkpoint fits its dims only
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


def save_npy(path: str, x: torch.Tensor) -> None:   # float32, atomically and durably
    atomic_write(path, lambda f: np.save(f, x.cpu().numpy().astype(np.float32)))


def run_cli(main) -> None:
    """Run a command's main(): bad input becomes one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except (embed_cache.DataError, ValueError, OSError, RuntimeError) as e:   # OSError: disk full, ...; RuntimeError: torch's
        print(f"error: {e if isinstance(e, (ValueError, OSError)) else reason(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # outside training's own handler (loading data, evaluating)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
