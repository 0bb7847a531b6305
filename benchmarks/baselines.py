"""Simpler ways across the modality gap, to measure DiffGAP against (benchmarks/research.py uses them).

    ridge    closed-form ridge regression from the condition to the target, then cosine to the gallery
    mlp      a regressor with the denoiser's parameter budget, trained like DiffGAP; then cosine
    plug-in  the Gaussian likelihood of the query under each gallery item, from the pairs' joint mean
             and covariance shrunk toward a scaled identity: on Gaussian-like data the strongest
             closed-form rule

Regularisation and shrinkage are chosen on the validation split. Ridge and the MLP work in DiffGAP's
own coordinates (DiffGAP.to_diffusion), so that they see DiffGAP's inputs. Direction d predicts
modality d from modality 1 - d, as in diffgap.py.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import diffgap as dg  # noqa: E402
import diffgap_eval as ev  # noqa: E402


# Ridge: W = argmin |X W - Y|^2 + lam |W|^2 on centred X, Y (the intercept is not penalised) -----------

class Ridge:
    """Linear map x -> (x - x_mean) W + y_mean, solved for many lambdas from one SVD of X."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        """x (N, D_in), y (N, D_out). Keeps the SVD; pick a lambda with fit(lam)."""
        x, y = x.double(), y.double()
        self.x_mean, self.y_mean = x.mean(0), y.mean(0)
        # X = U S V^T  =>  W(lam) = V diag(s / (s^2 + lam)) U^T Y
        self.U, self.s, self.V = torch.linalg.svd(x - self.x_mean, full_matrices=False)
        self.UtY = self.U.T @ (y - self.y_mean)                      # (r, D_out)

    def fit(self, lam: float) -> "Ridge":
        self.lam = lam
        self.W = self.V.T @ ((self.s / (self.s ** 2 + lam))[:, None] * self.UtY)  # (D_in, D_out)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.x_mean) @ self.W + self.y_mean).to(x.dtype)


def fit_ridge(model: dg.DiffGAP, train, val, direction: int, lambdas=None) -> tuple[Ridge, dict]:
    """Ridge for one direction in model's coordinates, lambda chosen by validation R@1 (ties: R@1 + R@5 +
    R@10) on embed_cache Splits: (the fitted map, {lambda: validation R@1})."""
    a, b = train.pairs()
    cond, target = (b, a) if direction == 0 else (a, b)
    ridge = Ridge(model.to_diffusion(cond, 1 - direction), model.to_diffusion(target, direction))
    # lambda relative to the mean squared singular value, so that the grid suits any N and scale
    base = float((ridge.s ** 2).mean())
    q, g, rel = val.retrieval(direction)
    scores = {}
    for lam in lambdas or [base * f for f in (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)]:
        m = ev.retrieval_metrics_from_embeddings(ridge_predict(model, ridge.fit(lam), q, direction), g, rel)
        scores[lam] = (m["R@1"], m["R@1"] + m["R@5"] + m["R@10"])
    return ridge.fit(max(scores, key=scores.get)), {lam: s[0] for lam, s in scores.items()}


def ridge_predict(model: dg.DiffGAP, ridge: Ridge, cond: torch.Tensor, direction: int) -> torch.Tensor:
    """Unit-norm predicted targets (N, D_target) for unit-norm conditions (N, D_cond)."""
    return model.from_diffusion(ridge(model.to_diffusion(cond, 1 - direction)), direction)


# Gaussian plug-in: rank by the likelihood of the query under each gallery item ------------------------

class GaussianPlugIn:
    """log N(q; E[q | g], Cov(q | g)) for a joint Gaussian fitted to paired (q, g) rows.

    With Sigma = [[S_qq, S_qg], [S_gq, S_gg]]: E[q | g] = m_g = mu_q + A (g - mu_g), A = S_qg S_gg^-1,
    and Cov(q | g) = S_qq - A S_gq = P^-1 for every g; log N = -1/2 q^T P q + q^T P m_g - 1/2 m_g^T P m_g
    + const, whose first term does not depend on g: one matrix product ranks a gallery.
    """

    def __init__(self, q: torch.Tensor, g: torch.Tensor):
        """q (N, D_q), g (N, D_g): training pairs. Keeps the joint moments; shrink with fit(lam)."""
        z = torch.cat([q, g], dim=1).double()
        self.mu, self.cov, self.d_q = z.mean(0), torch.cov(z.T), q.shape[1]

    def fit(self, lam: float) -> "GaussianPlugIn":
        """Sigma <- (1 - lam) Sigma + lam (tr Sigma / D) I, then the conditional of q given g."""
        D, dq = self.cov.shape[0], self.d_q
        S = (1 - lam) * self.cov + lam * self.cov.trace() / D * torch.eye(D, dtype=self.cov.dtype)
        A = torch.linalg.solve(S[dq:, dq:], S[dq:, :dq]).T                  # S_qg S_gg^-1, (D_q, D_g)
        self.A, self.c = A, self.mu[:dq] - A @ self.mu[dq:]
        self.P = torch.linalg.inv(S[:dq, :dq] - A @ S[dq:, :dq])             # (D_q, D_q)
        return self

    def scores(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(Q, G) log-likelihood of each query under each gallery item, up to a per-query constant."""
        m = g.double() @ self.A.T + self.c                                  # (G, D_q): E[q | g]
        Pm = m @ self.P
        return (q.double() @ Pm.T - 0.5 * (Pm * m).sum(1)[None, :]).float()


def fit_plugin(train, val, direction: int, lambdas=(1e-3, 1e-2, 0.03, 0.1, 0.3, 0.5, 0.7, 0.9)):
    """The plug-in for one direction, shrinkage chosen by validation R@1: (the fitted rule, {lambda: R@1})."""
    a, b = train.pairs()
    plugin = GaussianPlugIn(*((b, a) if direction == 0 else (a, b)))
    q, g, rel = val.retrieval(direction)
    scores = {lam: ev.retrieval_metrics(plugin.fit(lam).scores(q, g), rel)["R@1"] for lam in lambdas}
    return plugin.fit(max(scores, key=scores.get)), scores


# MLP: the denoiser with the diffusion taken out ---------------------------------------------------------

class Regressor(nn.Module):
    """cond (B, D_cond) -> predicted target (B, D_target): the pieces of dg.Denoiser (pre-norm residual
    blocks whose hidden step receives an embedding of the condition and the direction) without x_t
    and t; one network serves both directions, with a layer per modality when the dims differ."""

    def __init__(self, cfg: dg.DiffGAPConfig, inner: int, depth: int):
        super().__init__()
        H, dims = cfg.hidden, (cfg.dim_a, cfg.dim_b)
        n = 1 if cfg.dim_a == cfg.dim_b else 2
        self.c_in = nn.ModuleList([nn.Linear(dims[m], H) for m in range(n)])
        self.out = nn.ModuleList([nn.Linear(H, dims[m]) for m in range(n)])
        self.cond_mlp = nn.Sequential(nn.SiLU(), nn.Linear(H, inner))
        self.dir_emb = nn.Embedding(2, inner)
        self.blocks = nn.ModuleList([dg.ResidualBlock(H, inner) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(H)

    def forward(self, cond: torch.Tensor, direction: int) -> torch.Tensor:
        layer = lambda layers, modality: layers[modality % len(layers)]
        h = layer(self.c_in, 1 - direction)(cond)                       # (B, H)
        emb = self.cond_mlp(h) + self.dir_emb.weight[direction]         # (B, inner)
        for block in self.blocks:
            h = block(h, emb)
        return layer(self.out, direction)(self.norm_out(h))             # (B, D_target)


class MLPBaseline(dg.DiffGAP):
    """A DiffGAP whose network regresses the target directly (MSE in diffusion coordinates). Subclassing
    keeps the rest (scaling, EMA, direction_at), so dg.train_steps trains it unchanged. The inner width
    (a multiple of 16) makes the parameter count the denoiser's (1,449,984 vs 1,446,432 at the defaults)."""

    def __init__(self, config: dg.DiffGAPConfig, depth: int = 3):
        super().__init__(config)
        budget = self.num_params()   # the denoiser built by DiffGAP.__init__
        with torch.device("meta"):   # count parameters without allocating them
            count = lambda i: sum(p.numel() for p in Regressor(config, i, depth).parameters())
            per_unit = count(2) - count(1)          # the count is linear in the inner width
            inner = max(16, 16 * round(((budget - count(1)) / per_unit + 1) / 16))
        self.net = Regressor(config, inner, depth)
        self.ema = copy.deepcopy(self.net).requires_grad_(False) if config.ema_decay > 0 else None

    def loss(self, target: torch.Tensor, cond: torch.Tensor, direction: int, t=None, eps=None, drop=None):
        """MSE of the regression; train_steps' draws (t, eps, drop) are not used."""
        pred = self.net(self.to_diffusion(cond, 1 - direction), direction)
        return F.mse_loss(pred, self.to_diffusion(target, direction))

    @torch.no_grad()
    def predict(self, cond: torch.Tensor, direction: int) -> torch.Tensor:
        """Unit-norm predicted targets (N, D_target) with the EMA weights."""
        net = self.ema if self.ema is not None else self.net
        return self.from_diffusion(net(self.to_diffusion(cond, 1 - direction), direction), direction)
