"""Built-in synthetic stand-in for CLAP / CAVP embeddings, seeded and shaped like a real contrastive space (Liang
et al., "Mind the Gap", 2022). In a hidden basis, an audio item has a class and content s = class centre + spread in
an r-dim subspace (a caption adds its own noise); each modality sees s through its own per-dimension salience, sits
on a shared cone (coordinate 0) and its side of a gap (coordinate 1), and adds its own nuisance and noise. modes > 1:
each audio is one of its class's variants, unseen by B. Linear-Gaussian given the class, so `oracle_scores` ranks
with the true parameters: the reference ceiling."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Dataset, Split


@dataclass
class SyntheticConfig:
    dim: int = 512            # embedding dim of both modalities (CLAP and CAVP are 512)
    rank: int = 64            # r: dimensions of shared semantic content
    classes: int = 300        # number of semantic classes
    class_share: float = 0.6  # share of semantic energy in the class centre (rest: within-class)
    cone: float = 0.56        # shared cone offset (coordinate 0)
    gap: float = 0.40         # modality gap: +gap for audio, -gap for video/text (coordinate 1)
    semantic: float = 0.36    # energy of the semantic part (with nuisance and noise: rescaled to what cone, gap leave)
    salience: float = 1.0     # spread of per-dimension salience (0: identical in both modalities)
    nuisance: float = 0.25    # energy of the modality-specific nuisance directions
    nuisance_rank: int = 12   # number of nuisance directions per modality
    noise: float = 0.10       # energy of isotropic per-item noise
    perception: float = 0.4   # energy of per-modality noise on the semantic content (relative to s)
    caption_noise: float = 0.3  # audio-text: energy of per-caption description noise (relative to s)
    captions: int = 5         # audio-text: captions per audio (AudioCaps/Clotho layout)
    n_train: int = 20000      # audio items per split (audio-text: divided by `captions`)
    n_val: int = 1000
    n_test: int = 1000
    modes: int = 1            # audio variants per class that B does not show (1: one-to-one)
    mode_share: float = 0.0   # energy of a variant's offset (relative to s)
    seed: int = 0
    preset: str = "default"   # a PRESETS name; its values apply where an option is not given


# Regimes beside the default, so that no claim rests on one data design.
PRESETS = {
    "default": {},
    "aligned": dict(salience=0.4, nuisance=0.1, noise=0.05, perception=0.2, n_train=800, n_val=300),
    "multimodal": dict(modes=4, mode_share=1.0),
}


def make_config(**options) -> SyntheticConfig:
    """SyntheticConfig from options, the preset's values filling what is not given."""
    preset = options.get("preset", "default")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (use {', '.join(PRESETS)})")
    cfg = SyntheticConfig(**{**PRESETS[preset], **options})
    if cfg.dim < cfg.rank + 2 or cfg.nuisance_rank > cfg.dim:   # coordinates 0, 1: cone and gap
        raise ValueError(f"the synthetic layout needs dim >= rank + 2 and nuisance_rank <= dim "
                         f"(got dim={cfg.dim}, rank={cfg.rank}, nuisance_rank={cfg.nuisance_rank})")
    return cfg


class SyntheticSpace:
    """The generator's fixed parameters (drawn once from `seed`) and its sampler."""

    def __init__(self, pair: str, cfg: SyntheticConfig = SyntheticConfig()):
        if pair not in ("audio-video", "audio-text"):
            raise ValueError(f"pair must be 'audio-video' or 'audio-text', got {pair!r}")
        self.pair, self.cfg = pair, cfg
        D, r = cfg.dim, cfg.rank
        self.g = g = torch.Generator().manual_seed(cfg.seed * 1000 + (pair == "audio-text"))
        self.basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
        self.centres = torch.randn(cfg.classes, r, generator=g, dtype=torch.float64) * math.sqrt(cfg.class_share / r)
        # per-dimension salience, mean square 1: 1 + salience * N(0,1), kept positive
        sal = lambda: (1 + cfg.salience * torch.randn(r, generator=g, dtype=torch.float64)).abs()
        self.w = [w / w.pow(2).mean().sqrt() for w in (sal(), sal())]
        # nuisance directions: orthonormal, inside the semantic subspace, so they blur it
        self.nuis = []
        for _ in range(2):
            U = torch.zeros(D, cfg.nuisance_rank, dtype=torch.float64)
            U[2:2 + r] = torch.randn(r, cfg.nuisance_rank, generator=g, dtype=torch.float64)
            self.nuis.append(torch.linalg.qr(U)[0])  # (D, q)
        self.offset = [torch.tensor([cfg.cone, sign * cfg.gap] + [0.0] * (D - 2), dtype=torch.float64) for sign in (1, -1)]
        self.content_scale = math.sqrt(1 - cfg.cone ** 2 - cfg.gap ** 2)   # the norm left beside the cone and gap
        # (classes, modes, r) variant offsets: drawn last and only when asked for, so one-to-one data stays as it was
        self.variants = None if cfg.modes <= 1 else \
            torch.randn(cfg.classes, cfg.modes, r, generator=g, dtype=torch.float64) * math.sqrt(cfg.mode_share / r)

    # -- sampling -----------------------------------------------------------------------
    def _latent(self, m: int, s: torch.Tensor) -> torch.Tensor:
        """Latent vector of modality m (0 audio, 1 video/text) for semantic content s (n, r)."""
        cfg, (n, r) = self.cfg, s.shape
        s = s + torch.randn(n, r, generator=self.g, dtype=torch.float64) * math.sqrt(cfg.perception / r)
        rest = torch.zeros(n, cfg.dim, dtype=torch.float64)
        rest[:, 2:2 + r] = math.sqrt(cfg.semantic / (1 + cfg.perception)) * self.w[m] * s
        coef = torch.randn(n, cfg.nuisance_rank, generator=self.g, dtype=torch.float64)
        rest += math.sqrt(cfg.nuisance / cfg.nuisance_rank) * coef @ self.nuis[m].T
        rest[:, 2:] += math.sqrt(cfg.noise / cfg.dim) * torch.randn(n, cfg.dim - 2, generator=self.g, dtype=torch.float64)
        # One cone/gap part for every item: a varying norm would make short-content items hubs, not a gap effect
        return self.offset[m] + self.content_scale * torch.nn.functional.normalize(rest, dim=-1)

    def _observe(self, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(v @ self.basis.T, dim=-1).float()

    def sample_split(self, n: int) -> Split:
        cfg, r = self.cfg, self.cfg.rank
        labels = torch.randint(cfg.classes, (n,), generator=self.g)
        s = self.centres[labels] + torch.randn(n, r, generator=self.g, dtype=torch.float64) * math.sqrt((1 - cfg.class_share) / r)
        s_a = s if self.variants is None else s + self.variants[labels, torch.randint(cfg.modes, (n,), generator=self.g)]
        a = self._observe(self._latent(0, s_a))
        k = cfg.captions if self.pair == "audio-text" else 1
        s_b = s.repeat_interleave(k, 0)
        if self.pair == "audio-text":
            s_b = s_b + torch.randn(n * k, r, generator=self.g, dtype=torch.float64) * math.sqrt(cfg.caption_noise / r)
        b = self._observe(self._latent(1, s_b))
        return Split(a=a, b=b, b_to_a=torch.arange(n).repeat_interleave(k))

    # -- reference ceiling ----------------------------------------------------------------
    def _moments(self, m: int):
        """Mean (D,) and covariance (D, D) of modality m's latent vector, and W_m (D, r)."""
        cfg, D, r = self.cfg, self.cfg.dim, self.cfg.rank
        W = torch.zeros(D, r, dtype=torch.float64)
        W[2:2 + r] = torch.diag(math.sqrt(cfg.semantic / (1 + cfg.perception)) * self.w[m])
        content = 1.0 + cfg.perception + (cfg.caption_noise if (m == 1 and self.pair == "audio-text") else 0.0) \
            + (cfg.mode_share if (m == 0 and cfg.modes > 1) else 0.0)   # variants: moment-matched, not Bayes
        cov = content / r * W @ W.T + cfg.nuisance / cfg.nuisance_rank * self.nuis[m] @ self.nuis[m].T
        cov += cfg.noise / D * torch.eye(D, dtype=torch.float64)
        k = self.content_scale / math.sqrt(cfg.semantic + cfg.nuisance + cfg.noise)  # the normalisation
        return self.offset[m], k * k * cov, k * W

    def oracle_scores(self, query: torch.Tensor, gallery: torch.Tensor, direction: int) -> torch.Tensor:
        """log p(query | gallery item) up to a per-query constant, (Q, G), from the true parameters;
        direction 0: queries are B (video/text), the gallery audio; 1: the reverse."""
        qm, gm = (1, 0) if direction == 0 else (0, 1)
        mu_q, cov_q, W_q = self._moments(qm)
        mu_g, cov_g, W_g = self._moments(gm)
        r = self.cfg.rank
        cross = W_q @ W_g.T / r                          # Cov(v_q, v_g), (D, D)
        M = cross @ torch.linalg.inv(cov_g)              # E[v_q | v_g] = mu_q + M (v_g - mu_g)
        P = torch.linalg.inv(cov_q - M @ cross.T)        # inverse of Cov(v_q | v_g)
        q = query.double() @ self.basis                  # back to the latent basis
        pred = mu_q + (gallery.double() @ self.basis - mu_g) @ M.T  # (G, D)
        # -(q - pred)^T P (q - pred), dropping the q^T P q term that is constant per query
        return (2 * q @ P @ pred.T - ((pred @ P) * pred).sum(-1)).float()


def synthetic_dataset(pair: str, seed: int = 0, **overrides) -> Dataset:
    """The default data: train/val/test splits drawn from one `SyntheticSpace`; overrides may name a preset."""
    cfg = make_config(seed=seed, **overrides)
    space = SyntheticSpace(pair, cfg)
    # audio-text: as many training pairs as audio-video (5 captions per audio), same eval sizes
    n_train = cfg.n_train // (cfg.captions if pair == "audio-text" else 1)
    splits = {name: space.sample_split(n) for name, n in (("train", n_train), ("val", cfg.n_val), ("test", cfg.n_test))}
    return Dataset(pair=pair, spec=f"synthetic:seed={seed}", splits=splits, oracle=space.oracle_scores)
