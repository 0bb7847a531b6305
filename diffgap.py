"""DiffGAP: a lightweight conditional diffusion model inside a contrastive embedding space.

Mo, Chen, Bao, Zhu, "DiffGAP: A Lightweight Diffusion Module in Contrastive Space for Bridging
Cross-Modal Gap", ICASSP 2025 (arXiv 2503.12131). A small DDPM denoises one modality's CLAP /
CAVP embedding conditioned on the other's; one network serves both directions, trained with
bidirectional split training (Algorithm 1: condition and target swap every m iterations).

Read top to bottom: 1. noise schedule, 2. denoiser, 3. diffusion (loss, samplers), 4. training
loop, 5. retrieval and generation metrics. It needs only torch: copy it alone anywhere. The
commands' scores, caches, tables and checkpoints are in diffgap_eval.py.

Conventions: modality A is audio, B video or text; direction 0 is "B->A" (condition on B, as
Algorithm 1 starts), 1 is "A->B"; timesteps are 0..T-1. Unit embeddings e are diffused as
x = (e - mean) * scale, whose coordinates have unit variance like the N(0, I) noise.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


_kernels = None   # optional Triton kernels: kernels/ in a checkout, diffgap_kernels once installed,
for _name in ("kernels", "diffgap_kernels"):   # and only this project's (a PyPI package is called `kernels`)
    try:
        _kernels = importlib.import_module(_name)
    except Exception:  # absent, or triton cannot be imported here
        continue
    if hasattr(_kernels, "DIFFGAP_KERNELS"):
        break
    _kernels = None


@dataclass
class DiffGAPConfig:
    """The defaults are what `python train.py` trains; the paper's values are stated beside them."""
    dim_a: int = 512                 # embedding dim of modality A (audio)
    dim_b: int = 512                 # embedding dim of modality B (video or text)
    hidden: int = 512                # width of the residual stream (>= the embedding dims)
    inner: int = 224                 # width of each block's hidden step (the fused Triton step)
    depth: int = 2                   # number of residual blocks
    time_dim: int = 128              # size of the sinusoidal timestep features
    timesteps: int = 1000            # T; timesteps are 0..T-1
    schedule: str = "cosine"         # "cosine" (Nichol & Dhariwal) or "linear" (Ho et al.)
    objective: str = "v"             # predicted: "v", "eps" (the paper's) or "x0" (results/README.md)
    p_uncond: float = 0.1            # condition dropout, for classifier-free guidance (paper: 0)
    direction_embedding: bool = True  # a learned direction vector (False: the paper's shared net)
    center: bool = True              # subtract each modality's mean before scaling
    switch_every: int = 500          # m: swap condition and target every m steps (paper: 5000 of ~94k)
    ema_decay: float = 0.999         # EMA of the weights used for sampling; 0 turns EMA off

# 1. Noise schedule (Ho et al. 2020, eq. 4; Nichol & Dhariwal 2021, eq. 17) ---------------------

def make_schedule(kind: str, T: int) -> dict[str, torch.Tensor]:
    """beta_t and what follows from it, for t = 0..T-1: float32 tensors (T,), computed in float64
    (alpha_bar_{T-1} of the cosine schedule is ~1e-9: float32 cumulative products drift before)."""
    if kind == "linear":
        beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2          # alpha_bar(t) = f(t) / f(0)
        beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)                 # beta_t = 1 - abar_t/abar_{t-1}
    else:
        raise ValueError(f"unknown schedule {kind!r}: use 'cosine' or 'linear'")
    alpha = 1 - beta                                                  # alpha_t = 1 - beta_t
    alpha_bar = torch.cumprod(alpha, 0)                               # alpha_bar_t = prod_{s<=t} alpha_s
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    sched = dict(beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                 sqrt_alpha_bar=alpha_bar.sqrt(), sqrt_one_minus_alpha_bar=(1 - alpha_bar).sqrt(),
                 # q(x_{t-1} | x_t, x0) variance: beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
                 posterior_variance=beta * (1 - alpha_bar_prev) / (1 - alpha_bar))
    return {k: v.float() for k, v in sched.items()}


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """The S timesteps a few-step sampler visits, "trailing" from T-1: (1000, 5) -> [999, 799, 599, 399, 199], then x0."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    return [T - 1 - (i * T) // steps for i in range(steps)]


# 2. Denoiser network ---------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of integer timesteps (Vaswani et al. 2017): (B,) -> (B, dim), dim even."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]                      # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


KERNELS = "auto"  # "auto": the kernels on CUDA tensors; "torch"; "triton": always, no fallback (README)


def hidden_step(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The denoiser's hidden step silu(h @ W^T + b + temb): h (B, H), W (I, H), temb (B, I) -> (B, I).
    The time embedding enters every block here; kernels/ fuses it all into one Triton launch."""
    if KERNELS not in ("auto", "torch", "triton") or (KERNELS == "triton" and _kernels is None):
        raise ValueError(f"KERNELS = {KERNELS!r}: use 'auto', 'torch' or 'triton' (which needs kernels/ and triton)")
    if _kernels is not None and (KERNELS == "triton" or (KERNELS == "auto" and h.is_cuda)):
        return _kernels.fused_linear_temb_silu(h, weight, bias, temb, strict=KERNELS == "triton")
    return F.silu(F.linear(h, weight, bias) + temb)


class ResidualBlock(nn.Module):
    """h + W2 silu(W1 LN(h) + b1 + temb): a pre-norm residual MLP block with time conditioning."""

    def __init__(self, width: int, inner: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, inner)
        self.fc2 = nn.Linear(inner, width)
        nn.init.zeros_(self.fc2.weight)  # each block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(hidden_step(self.norm(h), self.fc1.weight, self.fc1.bias, temb))


def adapter(layers: nn.ModuleList, modality: int) -> nn.Module:
    """The layer serving modality 0 (A) or 1 (B): one shared layer when the dims are equal."""
    return layers[min(modality, len(layers) - 1)]


class Denoiser(nn.Module):
    """Predicts eps (or x0, v) for the noisy target x_t given the condition, t and direction.

    The condition's projection is added to x_t's at the input (a direct path for the mostly
    linear map between modalities), and an MLP of it joins the time (and direction) embedding
    in every block, as class labels do in DDPM; a learned null vector replaces it for
    classifier-free guidance. Unequal dims give each modality its own in/out layers.
    """

    def __init__(self, cfg: DiffGAPConfig):
        super().__init__()
        H, I, dims = cfg.hidden, cfg.inner, (cfg.dim_a, cfg.dim_b)
        n_adapters = 1 if cfg.dim_a == cfg.dim_b else 2
        # index [m] serves modality m (0: A, 1: B); a single shared layer when dims are equal
        self.x_in = nn.ModuleList([nn.Linear(dims[m], H) for m in range(n_adapters)])
        self.c_in = nn.ModuleList([nn.Linear(dims[m], H) for m in range(n_adapters)])
        self.out = nn.ModuleList([nn.Linear(H, dims[m]) for m in range(n_adapters)])
        self.null_cond = nn.Parameter(torch.zeros(H))  # learned "no condition" (for CFG)
        # sinusoidal features of every timestep 0..T-1, looked up rather than recomputed per call
        self.register_buffer("time_features", timestep_embedding(torch.arange(cfg.timesteps), cfg.time_dim),
                             persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, I), nn.SiLU(), nn.Linear(I, I))
        self.cond_mlp = nn.Sequential(nn.SiLU(), nn.Linear(H, I))
        self.dir_emb = nn.Embedding(2, I) if cfg.direction_embedding else None
        self.blocks = nn.ModuleList([ResidualBlock(H, I) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(H)

    def project_cond(self, cond: torch.Tensor, direction: int, drop_cond=None):
        """The condition's two entry points: c (B, H) for the input, c_emb (B, I) for every block;
        drop_cond (B,) bool replaces those rows' projection by the null vector."""
        c = adapter(self.c_in, 1 if direction == 0 else 0)(cond)           # (B, H)
        if drop_cond is not None:
            c = torch.where(drop_cond[:, None], self.null_cond.expand_as(c), c)
        return c, self.cond_mlp(c)

    def null_projection(self, rows: int):
        """project_cond of the null condition, for `rows` rows (views, no copies)."""
        c = self.null_cond.expand(rows, -1)
        return c, self.cond_mlp(self.null_cond).expand(rows, -1)

    def denoise(self, x_t, t, cond_proj, direction: int):
        """x_t (B, D_target), t (B,) int tensor or one int for every row, cond_proj from project_cond."""
        tgt = 0 if direction == 0 else 1
        c, c_emb = cond_proj
        emb = self.time_mlp(self.time_features[t].to(x_t.dtype))             # (B, I), or (I,) for a shared t
        if self.dir_emb is not None:
            emb = emb + self.dir_emb.weight[direction]
        emb = emb + c_emb                                                    # (B, I)
        h = adapter(self.x_in, tgt)(x_t) + c                                 # (B, H)
        for block in self.blocks:
            h = block(h, emb)
        return adapter(self.out, tgt)(self.norm_out(h))                      # (B, D_target)

    def forward(self, x_t, t, cond, direction: int, drop_cond=None):
        """x_t (B, D_target), t (B,) int, cond (B, D_cond), drop_cond (B,) bool or None -> (B, D_target)."""
        return self.denoise(x_t, t, self.project_cond(cond, direction, drop_cond), direction)


# 3. Diffusion: embedding scaling, training loss, samplers --------------------------------------

class DiffGAP(nn.Module):
    """The denoiser, its EMA copy, the schedule and the per-modality embedding statistics."""

    def __init__(self, config: DiffGAPConfig):
        super().__init__()
        if config.objective not in ("eps", "x0", "v"):
            raise ValueError(f"unknown objective {config.objective!r}: use 'eps', 'x0' or 'v'")
        self.config = config
        self.net = Denoiser(config)
        self.ema = copy.deepcopy(self.net).requires_grad_(False) if config.ema_decay > 0 else None
        # Plain float32 CPU tensors, not buffers: module.to(torch.float16) would round alpha_bar
        # near t = 0 to 1.0, and the samplers divide by 1 - alpha_bar.
        for name, value in make_schedule(config.schedule, config.timesteps).items():
            setattr(self, name, value)
        # mean unit embedding per modality, fitted on training data by fit_stats
        self.register_buffer("mean_a", torch.zeros(config.dim_a))
        self.register_buffer("mean_b", torch.zeros(config.dim_b))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def direction_at(self, step: int) -> int:
        """Bidirectional split training (Algorithm 1): 0 (B->A) for m steps, then 1, then 0..."""
        return (step // self.config.switch_every) % 2

    # -- embedding space <-> diffusion space ---------------------------------------------------
    @torch.no_grad()
    def fit_stats(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Store each modality's mean unit embedding (config.center); a (N, D_A), b (M, D_B), sliceable."""
        if self.config.center:
            for x, mean in ((a, self.mean_a), (b, self.mean_b)):
                total = sum(F.normalize(x[i:i + 65536].double(), dim=-1).sum(0) for i in range(0, len(x), 65536))
                mean.copy_(total / len(x))

    def _stats(self, modality: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.mean_a if modality == 0 else self.mean_b
        # unit vectors minus their mean have total variance 1 - |mean|^2; spread it over D coords
        scale = torch.sqrt(mean.numel() / (1 - mean.pow(2).sum()).clamp(min=1e-6))
        return mean, scale

    def to_diffusion(self, e: torch.Tensor, modality: int) -> torch.Tensor:
        """Unit-norm contrastive embedding (B, D) -> diffusion space, ~unit variance per coord."""
        mean, scale = self._stats(modality)
        return (F.normalize(e, dim=-1) - mean) * scale   # out of place: the caller's e is untouched

    def from_diffusion(self, x: torch.Tensor, modality: int) -> torch.Tensor:
        """Diffusion space (B, D) -> unit-norm contrastive embedding."""
        mean, scale = self._stats(modality)
        return F.normalize(x / scale + mean, dim=-1)

    def onto_sphere(self, x: torch.Tensor, modality: int) -> torch.Tensor:
        """to_diffusion(from_diffusion(x)) in two passes: with u = x + scale mean (normalize
        ignores the positive factor 1 / scale), the result is u * (scale / |u|) - scale mean."""
        mean, scale = self._stats(modality)
        u = x + scale * mean                                                    # (B, D)
        return torch.addcmul(-scale * mean, u, scale / u.norm(dim=-1, keepdim=True).clamp(min=1e-12))

    # -- training loss (Algorithm 1, lines 5-8; Ho et al. eq. 14) -------------------------------
    def loss(self, target: torch.Tensor, cond: torch.Tensor, direction: int, t: torch.Tensor, eps: torch.Tensor,
             drop: torch.Tensor | None = None) -> torch.Tensor:
        """MSE of the denoiser: target (B, D_target), cond (B, D_cond) unit norm, t (B,) int in
        0..T-1, eps (B, D_target) noise, drop (B,) bool rows given the null condition (or None)."""
        tgt, src = (0, 1) if direction == 0 else (1, 0)
        x0 = self.to_diffusion(target, tgt)
        c = self.to_diffusion(cond, src)   # the condition gets the same unit-variance scaling
        sa = self.sqrt_alpha_bar.to(t.device)[t][:, None].to(x0.dtype)         # (B, 1)
        so = self.sqrt_one_minus_alpha_bar.to(t.device)[t][:, None].to(x0.dtype)
        x_t = sa * x0 + so * eps                                   # q(x_t | x0), Ho et al. eq. 4
        pred = self.net(x_t, t, c, direction, drop)
        target_of = {"eps": eps, "x0": x0, "v": sa * eps - so * x0}  # v: Salimans & Ho 2022
        return F.mse_loss(pred, target_of[self.config.objective])

    def forward(self, *args) -> torch.Tensor:  # the training loss: what DistributedDataParallel wraps
        return self.loss(*args)

    # -- from a network output to x0 ------------------------------------------------------------
    def _x0(self, out: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The x0 a network output implies, from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
        sa, so = float(self.sqrt_alpha_bar[t]), float(self.sqrt_one_minus_alpha_bar[t])
        if self.config.objective == "eps":
            return torch.add(x_t, out, alpha=-so) / sa          # (x_t - so eps) / sa
        if self.config.objective == "x0":
            return out
        return torch.add(sa * x_t, out, alpha=-so)              # v: x0 = sa x_t - so v

    def _condition(self, net, c: torch.Tensor, direction: int, guidance: float):
        """The condition's projection for _predict; with guidance, the null's rows follow."""
        cond_proj = net.project_cond(c, direction)
        if guidance == 1.0:
            return cond_proj
        return tuple(torch.cat([p, n]) for p, n in zip(cond_proj, net.null_projection(c.shape[0])))

    def _predict(self, net, x_t, t: int, cond_proj, direction: int, guidance: float):
        """Network output at timestep t, classifier-free guided (both passes as one call) when guidance != 1."""
        if guidance == 1.0:
            return net.denoise(x_t, t, cond_proj, direction)
        pred_cond, pred_null = net.denoise(x_t.repeat(2, 1), t, cond_proj, direction).chunk(2)
        return torch.lerp(pred_null, pred_cond, guidance)   # pred_null + s (pred_cond - pred_null), Ho & Salimans 2022

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, direction: int, steps: int = 5, sampler: str = "ddim",
               eta: float = 0.0, guidance: float = 1.0, generator=None, use_ema: bool = True,
               project: bool = True, denoise_fn=None) -> torch.Tensor:
        """Generate target-modality embeddings for unit-norm conditions cond (N, D_cond) -> (N, D_target).

        "ddim" (Song et al. 2021, eq. 12) visits ddim_timesteps(T, steps); "ddpm" is ancestral
        sampling (Ho et al. Algorithm 2) over them with the respaced chain's betas. project puts
        each predicted x0 back on the embedding sphere (clipping to [-1, 1] would destroy it).
        denoise_fn(x_t, t, cond, direction) replaces the network (tests use an oracle).
        """
        if guidance != 1.0 and self.config.p_uncond == 0:
            raise ValueError("guidance != 1 needs a model trained with p_uncond > 0 (no null condition was learned)")
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}: use 'ddim' or 'ddpm'")
        tgt, src = (0, 1) if direction == 0 else (1, 0)
        net = self.ema if (use_ema and self.ema is not None) else self.net
        c = self.to_diffusion(cond.to(self.mean_a.device, self.mean_a.dtype), src)
        dim = (self.config.dim_a, self.config.dim_b)[tgt]
        x = torch.randn(c.shape[0], dim, generator=generator, device=c.device, dtype=c.dtype)  # x_{T-1}
        cond_proj = self._condition(net, c, direction, guidance) if denoise_fn is None else None
        ts = ddim_timesteps(self.config.timesteps, steps)
        for i, t in enumerate(ts):
            out = (denoise_fn(x, t, c, direction) if denoise_fn is not None
                   else self._predict(net, x, t, cond_proj, direction, guidance))
            x0 = self._x0(out, x, t)
            if project:
                x0 = self.onto_sphere(x0, tgt)
            ab = float(self.alpha_bar[t])
            ab_prev = float(self.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0  # the last step lands on x0
            if sampler == "ddim":
                # sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
                sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
                # x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps (+ sigma z below), with
                # eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), the noise that agrees with x0:
                # x_prev = c_x0 x0 + c_xt x_t, coefficients in float64
                c_xt = math.sqrt(max(0.0, 1 - ab_prev - sigma ** 2) / (1 - ab))
                c_x0 = math.sqrt(ab_prev) - c_xt * math.sqrt(ab)
                x = torch.add(c_x0 * x0, x, alpha=c_xt)
            else:
                # posterior q(x_prev | x_t, x0) of the respaced chain, beta = 1 - abar_t / abar_prev
                beta = 1 - ab / ab_prev
                x = (math.sqrt(ab_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - ab_prev) * x) / (1 - ab)
                sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab))
            if i + 1 < len(ts) and sigma > 0:  # no noise is added on the final step
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.from_diffusion(x, tgt)

    @torch.no_grad()
    def sample_many(self, cond: torch.Tensor, direction: int, num_samples: int, max_rows: int = 4096,
                    **sample_kw) -> torch.Tensor:
        """num_samples samples for each condition: cond (N, D_cond) -> (K, N, D_target). Blocks of
        n conditions are sampled as one (K n <= max_rows)-row batch, so memory stays bounded."""
        per_block = max(1, max_rows // num_samples)
        blocks = []
        for i in range(0, cond.shape[0], per_block):
            c = cond[i:i + per_block]                                                  # (n, D_cond)
            x = self.sample(c.repeat(num_samples, 1), direction, **sample_kw)          # (K n, D): sample k = rows k n..
            blocks.append(x.view(num_samples, c.shape[0], -1))
        return torch.cat(blocks, dim=1)

    @torch.no_grad()
    def translate(self, cond: torch.Tensor, direction: int, num_samples: int = 16, max_rows: int = 4096,
                  **sample_kw) -> torch.Tensor:
        """sample_many(...).mean(0) in bounded memory, (N, D_cond) -> (N, D_target): the posterior
        mean E[target | cond], which ranks a gallery far better than one sample."""
        n = max(1, max_rows // num_samples)
        return torch.cat([self.sample_many(cond[i:i + n], direction, num_samples, max_rows, **sample_kw).mean(0)
                          for i in range(0, cond.shape[0], n)])

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """EMA of the weights after optimiser step `step`; the decay warms up over early steps."""
        if self.ema is not None:
            d = min(self.config.ema_decay, (1 + step) / (10 + step))
            # p_ema = d p_ema + (1 - d) p, for every parameter in one call
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - d)


# 4. Training loop: bidirectional split training (paper, Algorithm 1) ---------------------------

def derived_seed(seed: int, stream: str, n: int) -> int:
    """A seed for item n of a random stream ("epoch", "step"): a run is a function of (seed, step)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1          # < 2**63, as manual_seed wants


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    """n_pairs // batch_size full batches; the rows left over (others each epoch) wait for the next."""
    if not 1 <= batch_size <= n_pairs:
        raise ValueError(f"batch size {batch_size} must be between 1 and the number of training pairs ({n_pairs})")
    return n_pairs // batch_size


def epoch_order(n_pairs: int, epoch: int, seed: int = 0) -> torch.Tensor:
    """The permutation of the training pairs that epoch `epoch` visits batch by batch: (n_pairs,) int64."""
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch)))


def batch_indices(n_pairs: int, batch_size: int, step: int, seed: int = 0) -> torch.Tensor:
    """Rows of the minibatch of global step `step`: (batch_size,) int64."""
    epoch, pos = divmod(step, steps_per_epoch(n_pairs, batch_size))
    return epoch_order(n_pairs, epoch, seed)[pos * batch_size:(pos + 1) * batch_size]


def train_steps(model: DiffGAP, a: torch.Tensor, b: torch.Tensor, optimizer: torch.optim.Optimizer,
                steps: int, batch_size: int = 64, start_step: int = 0, direction: str = "both", seed: int = 0,
                share: tuple[int, int] = (0, 1), net=None):
    """Yield {"step", "loss", "direction"} after each optimisation step (the loss a 0-dim tensor).

    a (N, D_A), b (N, D_B) paired rows. Global step s trains on batch_indices(N, batch_size, s,
    seed) in direction model.direction_at(s) ("b2a"/"a2b" fix it), with t, eps and the dropout
    drawn from derived_seed(seed, "step", s): a resumed run continues exactly. A non-finite loss
    raises FloatingPointError before its update. Under torchrun, share = (rank, world_size)
    takes this process's slice of each global batch and its draws, and net wraps model in
    DistributedDataParallel: the run equals one process.
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must be paired row for row, got {len(a)} and {len(b)} rows")
    rank, world = share
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} must be a multiple of the {world} processes")
    mine = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    fixed = {"both": None, "b2a": 0, "a2b": 1}[direction]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    per_epoch = steps_per_epoch(len(a), batch_size)
    model.train()
    order, order_epoch = None, None
    for step in range(start_step, start_step + steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch != order_epoch:  # batch_indices(), with the permutation drawn once per epoch
            order, order_epoch = epoch_order(len(a), epoch, seed), epoch
        idx = order[pos * batch_size:(pos + 1) * batch_size][mine]
        d = model.direction_at(step) if fixed is None else fixed          # Algorithm 1, line 4
        target, cond = (a[idx], b[idx]) if d == 0 else (b[idx], a[idx])
        g = torch.Generator(device).manual_seed(derived_seed(seed, "step", step))
        t = torch.randint(0, model.config.timesteps, (batch_size,), device=device, generator=g)[mine]
        eps = torch.randn((batch_size, target.shape[1]), device=device, dtype=dtype, generator=g)[mine]
        drop = (torch.rand(batch_size, device=device, generator=g)[mine] < model.config.p_uncond
                if model.config.p_uncond > 0 else None)
        loss = (net or model)(target.to(device), cond.to(device), d, t, eps, drop)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: the loss is {loss.item()} (direction {d}); the weights "
                                     f"are those after step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_ema(step)
        yield {"step": step + 1, "loss": loss.detach(), "direction": d}


def make_optimizer(model: DiffGAP, lr: float = 1e-3) -> torch.optim.Optimizer:
    """Adam on the denoiser's weights (the paper's optimiser; its lr 2e-4 served ~94k steps, 1e-3
    suits the 3,000 here). fused=True: one kernel for all ~56 tensors, not a Python loop on the CPU."""
    return torch.optim.Adam(model.net.parameters(), lr=lr, fused=True)


# 5. Metrics: retrieval (R@k, median rank, mAP@10) and generation quality ----------------------

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


def _relevance(relevant: torch.Tensor, Q: int, G: int) -> torch.Tensor:
    """relevant as (Q,) int labels or a (Q, G) bool mask, checked; returns it unchanged."""
    want = (Q, G) if relevant.dtype == torch.bool else (Q,)
    if tuple(relevant.shape) != want:
        raise ValueError(f"relevant has shape {tuple(relevant.shape)}, expected {want} for {Q} queries x {G} items")
    if relevant.dtype == torch.bool:
        none = relevant.sum(1) == 0
        if none.any():
            raise ValueError(f"query {int(none.nonzero()[0, 0])} has no relevant gallery item")
    elif len(relevant) and not (0 <= int(relevant.min()) and int(relevant.max()) < G):
        raise ValueError(f"relevant labels must be gallery rows 0..{G - 1}")
    return relevant


def _metrics(first: torch.Tensor, top_hits: torch.Tensor, n_rel: torch.Tensor, ks) -> dict[str, float]:
    """The metrics of one ordering: first (Q,) 1-based rank of each query's best correct item,
    top_hits (Q, <=10) bool relevance of its top-ranked items, n_rel (Q,) its number of correct items.

    median_rank is the median of the 1-based ranks, the mean of the two middle ones for an even
    count (numpy.median, as CLIP4Clip reports it); LAION-CLAP's and open_clip's evaluation print
    floor(median of 0-based ranks) + 1 instead, which is 1 where this gives 1.5 for ranks 1, 1, 2, 3.
    AP@10 = sum_{k<=10} P@k rel_k / min(n_rel, 10), which never exceeds 1.
    """
    out = {f"R@{k}": (first <= k).float().mean().item() for k in ks}
    out["median_rank"] = first.double().quantile(0.5).item()
    hits = top_hits.float()
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1, device=hits.device)
    out["mAP@10"] = ((precision * hits).sum(1) / n_rel.clamp(max=10)).mean().item()
    return out


def retrieval_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k, median rank and mAP@10 (conventions: _metrics) from scores (Q, G), higher is better,
    ties to the lower index. relevant: (Q,) int, one correct item per query, or (Q, G) bool, several
    (an audio's 5 captions: a hit at k when any is in the top k). One stable sort per row; a
    non-finite score, a query with no correct item or a wrong shape is a ValueError."""
    Q, G = scores.shape
    check_finite(scores, "scores")
    relevant = _relevance(relevant, Q, G)
    if relevant.dtype != torch.bool:
        relevant = F.one_hot(relevant.long(), G).bool()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices   # (Q, G)
    hits = relevant.gather(1, order)                                         # (Q, G) rel at each rank
    return _metrics(hits.float().argmax(1) + 1, hits[:, :10], relevant.sum(1), ks)


def _top(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) (Q, k) of the k best columns of each row of s (Q, n), best first, ties to
    the lower column (torch.topk alone breaks ties arbitrarily)."""
    k = min(k, s.shape[1])
    kth = s.topk(k, dim=1).values[:, -1:]                                      # (Q, 1)
    above, tied = s > kth, s == kth
    keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))  # exactly k per row
    cols = keep.nonzero()[:, 1].view(-1, k)                                     # ascending columns
    vals = s.gather(1, cols)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


@torch.no_grad()
def retrieval_metrics_from_embeddings(queries: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor,
                                      ks=(1, 5, 10), chunk: int = 8192, return_ranks: bool = False):
    """retrieval_metrics(cosine_scores(queries, gallery), relevant) without the (Q, G) score matrix.

    queries (Q, D), gallery (G, D) (any row-sliceable array), relevant (Q,) int or (Q, G) bool as
    in retrieval_metrics. return_ranks: also return each query's rank of its best correct item,
    (Q,) int, 1-based. Every metric comes from one ordering of each query's scores, whatever the
    relevance form: a running top 10 (ties to the lower index) is kept chunk by chunk over the
    gallery, and a query whose best correct item is not in it is ranked by counting the items
    that beat that item in a second pass. Raises ValueError naming a non-finite row.
    """
    Q, G = queries.shape[0], gallery.shape[0]
    relevant = _relevance(relevant, Q, G)
    q = _unit_rows(queries, "query")
    k10 = min(10, G)
    def chunks():  # normalised gallery chunks; recomputed per pass rather than copying the gallery
        for start in range(0, G, chunk):
            g = _unit_rows(gallery[start:start + chunk], "gallery", start)
            idx = torch.arange(start, start + len(g), device=q.device)
            rel = relevant[:, start:start + len(g)] if relevant.dtype == torch.bool else relevant[:, None] == idx
            yield idx, q @ g.T, rel                                                   # (n,), (Q, n), (Q, n)

    top_s = torch.empty(Q, 0, device=q.device)
    top_i = torch.empty(Q, 0, dtype=torch.long, device=q.device)
    best_s = torch.full((Q,), float("-inf"), device=q.device)     # each query's best correct item,
    best_i = torch.zeros(Q, dtype=torch.long, device=q.device)    # the lowest index among ties
    for idx, s, rel in chunks():
        v, i = _top(s, k10)
        # the running top 10 holds lower indices than this chunk, so a stable sort keeps ties in index order
        v, i = torch.cat([top_s, v], 1), torch.cat([top_i, idx[i]], 1)
        order = v.sort(dim=1, descending=True, stable=True).indices[:, :k10]
        top_s, top_i = v.gather(1, order), i.gather(1, order)
        v, i = torch.where(rel, s, float("-inf")).max(1)
        take = v > best_s
        best_s, best_i = torch.where(take, v, best_s), torch.where(take, idx[i], best_i)
    top_hits = (relevant.gather(1, top_i) if relevant.dtype == torch.bool else top_i == relevant[:, None])
    in_top = top_hits.any(1)
    first = torch.where(in_top, top_hits.float().argmax(1) + 1, 0)
    if not in_top.all():   # ranks beyond 10: count what beats the best correct item
        count = torch.ones(Q, dtype=torch.long, device=q.device)
        for idx, s, _ in chunks():
            count += ((s > best_s[:, None]) | ((s == best_s[:, None]) & (idx < best_i[:, None]))).sum(1)
        first = torch.where(in_top, first, count.clamp(min=k10 + 1))   # outside the top 10 by the one ordering
    n_rel = relevant.sum(1) if relevant.dtype == torch.bool else torch.ones(Q, device=q.device)
    out = _metrics(first, top_hits, n_rel, ks)
    return (out, first) if return_ranks else out


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to x (N, D) and y (M, D), in float64:
    |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2), symmetric eigendecompositions only."""
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
    """Mean cosine of each x row (Q, D) with its true pair(s) in gallery (G, D); relevant (Q,) int
    or (Q, G) bool (the mean over its pairs)."""
    x, gallery = _unit_rows(x, "generated"), _unit_rows(gallery, "gallery")
    relevant = _relevance(relevant, len(x), len(gallery))
    if relevant.dtype != torch.bool:
        return (x * gallery[relevant]).sum(1).mean().item()
    rel = relevant.float()
    return ((x * (rel @ gallery)).sum(1) / rel.sum(1)).mean().item()
