"""The picture of the modality gap, and of DiffGAP crossing it, as a plain SVG (no plotting library).

    python benchmarks/plot_gap.py                         # newest runs/*/ckpt.pt -> results/gap.svg
    python benchmarks/plot_gap.py --ckpt runs/audio-text/ckpt.pt --out gap_text.svg

Left: the test split in 2-D (a PCA of the real embeddings of both modalities): audio, video (or text),
and audio generated from the video (one sample each, 5 DDIM steps, guidance 1, as `sample.py --cond`
writes them). The real clouds sit apart (the modality gap); the generated points land among the audio.
Right: test R@1 against K, the guided samples averaged for the diffgap score, both directions, with
the contrastive score and the two-way score at K = 16 for reference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffgap_eval as ev  # noqa: E402
import embed_cache  # noqa: E402

COLOURS = {"audio": "#1f77b4", "other": "#ff7f0e", "generated": "#2ca02c", "B->A": "#1f77b4", "A->B": "#d62728"}
KS = (1, 2, 4, 8, 16)


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """The top two principal directions of x (N, D) -> (D, 2), and the mean they are taken about."""
    mean = x.mean(0)
    _, _, V = torch.linalg.svd(x - mean, full_matrices=False)
    return V[:2].T, mean


class Panel:
    """Maps data coordinates into an SVG box and collects its elements."""

    def __init__(self, left: float, top: float, size: float, xs, ys, pad: float = 0.05):
        lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
        span_x, span_y = (hi_x - lo_x) or 1.0, (hi_y - lo_y) or 1.0
        self.x = lambda v: left + size * (pad + (1 - 2 * pad) * (v - lo_x) / span_x)
        self.y = lambda v: top + size * (1 - pad - (1 - 2 * pad) * (v - lo_y) / span_y)
        self.parts = [f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#999"/>']

    def dots(self, pts, colour: str, r: float = 2.2, opacity: float = 0.55):
        self.parts += [f'<circle cx="{self.x(a):.1f}" cy="{self.y(b):.1f}" r="{r}" fill="{colour}" '
                       f'fill-opacity="{opacity}"/>' for a, b in pts]

    def line(self, pts, colour: str, dash: str = "", width: float = 2):
        coords = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in pts)
        self.parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="{width}"'
                          + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")

    def text(self, x: float, y: float, s: str, size: int = 13, anchor: str = "start", colour: str = "#222"):
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}" '
                          f'font-family="sans-serif">{s}</text>')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint (default: the newest runs/*/ckpt.pt)")
    p.add_argument("--out", default="results/gap.svg")
    p.add_argument("--points", type=int, default=400, help="items of each kind drawn in the left panel")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = ev.find_checkpoint(args.ckpt)
    model, ckpt = ev.load_checkpoint(path, needs=("step", "pair", "data"))
    model.eval()
    data = embed_cache.load(ckpt["run"]["data"], ckpt["run"]["pair"])
    if data.dims[0] != data.dims[1]:
        raise SystemExit(f"{path}: the picture needs both modalities in one space (dims {data.dims})")
    test, other = data.splits["test"], ckpt["run"]["pair"].split("-")[1]
    g = torch.Generator().manual_seed(args.seed)

    # left: one real pair per audio item (its first B row), and audio generated from those B rows
    n = min(args.points, len(test.a))
    first_b = torch.tensor([int((test.b_to_a == i).nonzero()[0]) for i in range(n)])
    audio, video = test.a[:n], test.b[first_b]
    generated = model.sample(video, 0, steps=5, generator=g)                     # (n, D), guidance 1
    V, mean = pca_2d(torch.cat([test.a, test.b]))
    proj = {k: ((x - mean) @ V).tolist() for k, x in (("audio", audio), ("other", video), ("generated", generated))}
    xs, ys = zip(*(pt for pts in proj.values() for pt in pts))
    left = Panel(20, 50, 420, xs, ys)
    for k in ("audio", "other", "generated"):
        left.dots(proj[k], COLOURS[k])
    for i, (k, label) in enumerate((("audio", "audio (real)"), ("other", f"{other} (real)"),
                                    ("generated", f"audio generated from {other}"))):
        left.parts.append(f'<circle cx="34" cy="{66 + 18 * i}" r="5" fill="{COLOURS[k]}"/>')
        left.text(46, 71 + 18 * i, label)
    left.text(230, 40, f"test embeddings, PCA of the real ones ({ckpt['run']['pair']})", 14, "middle")

    # right: R@1 against K for the diffgap score, both directions; contrastive and two-way for scale
    guidance = ev.rank_guidance(model, ev.RANK_GUIDANCE)
    curves, flat = {}, {}
    for d, name in ev.DIRECTIONS.items():
        q, gal, rel = test.retrieval(d)
        samples = model.sample_many(q, d, max(KS), steps=5, guidance=guidance, generator=g)   # (K, Q, D)
        shrunk = lambda x: model.toward_condition(x, q, d, float(model.lam[d]))   # the diffgap score's translation
        curves[name] = [100 * ev.retrieval_metrics_from_embeddings(shrunk(samples[:k].mean(0)), gal, rel)["R@1"]
                        for k in KS]
        q_hat_g = model.translate(gal, 1 - d, max(KS), steps=5, guidance=ev.rank_guidance(model, ev.GALLERY_GUIDANCE),
                                  generator=g)                                   # the gallery side, as sample.py
        two = ev.score_retrieval(q, gal, rel, shrunk(samples.mean(0)), q_hat_g, scores=["contrastive", "two-way"])
        flat[name] = (100 * two["contrastive"]["R@1"], 100 * two["two-way"]["R@1"])
    top = max([v for c in curves.values() for v in c] + [t for _, t in flat.values()])
    right = Panel(500, 50, 420, [0, 4.2], [0, top * 1.08], pad=0.08)
    for name, c in curves.items():
        pts = list(enumerate(c))
        right.line(pts, COLOURS[name])
        right.dots(pts, COLOURS[name], r=3.5, opacity=1)
        right.line([(0, flat[name][0]), (4, flat[name][0])], COLOURS[name], dash="5,4", width=1.2)
        right.dots([(4, flat[name][1])], COLOURS[name], r=5, opacity=0.5)
    for i, k in enumerate(KS):
        right.text(right.x(i), 490, str(k), 12, "middle")
    for v in range(0, int(top * 1.08) + 1, 10):
        right.text(494, right.y(v) + 4, str(v), 12, "end")
    right.text(710, 510, "K, guided samples averaged (5 DDIM steps)", 13, "middle")
    right.text(710, 40, "test R@1 (%)", 14, "middle")
    for i, name in enumerate(curves):
        right.text(512, 70 + 18 * i, f"{name} diffgap (solid); contrastive (dashed); two-way at K=16 (disc)",
                   12, colour=COLOURS[name])
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="940" height="530" viewBox="0 0 940 530">',
           '<rect width="940" height="530" fill="white"/>', *left.parts, *right.parts, "</svg>"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ev.atomic_write(args.out, lambda f: f.write("\n".join(svg).encode()))
    for name, c in curves.items():
        print(f"{name}: R@1 at K={', '.join(f'{k}: {v:.1f}' for k, v in zip(KS, c))}; contrastive {flat[name][0]:.1f}, "
              f"two-way (K=16) {flat[name][1]:.1f}")
    print(f"wrote {args.out} ({path}, step {ckpt['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
