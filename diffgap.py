"""DiffGAP: a lightweight conditional diffusion model inside a contrastive embedding space.

Mo, Chen, Bao, Zhu, "DiffGAP: A Lightweight Diffusion Module in Contrastive Space for Bridging
Cross-Modal Gap", ICASSP 2025 (arXiv 2503.12131). A small DDPM denoises one modality's CLAP /
CAVP embedding conditioned on the other's; one network serves both directions, trained with
bidirectional split training (Algorithm 1: condition and target swap every m iterations).

Read top to bottom: 1. noise schedule, 2. denoiser, 3. diffusion (scaling, loss, samplers, EMA),
4. the training loop. It needs only torch: copy it alone anywhere (metrics, checkpoints and the
commands are in diffgap_eval.py, train.py and sample.py). Conventions: modality 0 (A) is audio,
1 (B) video or text; direction d denoises modality d given 1 - d: 0 is "B->A" (as Algorithm 1
starts), 1 is "A->B". Timesteps are 0..T-1. Unit embeddings e are diffused as
x = (e - mean) * scale, whose coordinates have unit variance like the N(0, I) noise.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:   # the optional Triton kernels: kernels/ in a checkout (Hugging Face's `kernels` has no such name) ...
    from kernels import fused_linear_temb_silu as _fused_step
except ImportError:
    try:   # ... or diffgap_kernels once pip-installed; copied alone, this file uses torch only
        from diffgap_kernels import fused_linear_temb_silu as _fused_step
    except ImportError:
        _fused_step = None


@dataclass
class DiffGAPConfig:
    """The defaults are what `python train.py` trains; the paper's values are stated beside them."""
    dim_a: int = 512                 # embedding dim of modality A (audio)
    dim_b: int = 512                 # embedding dim of modality B (video or text)
    hidden: int = 512                # width of the residual stream
    inner: int = 224                 # width of each block's hidden step (the fused Triton step)
    depth: int = 2                   # number of residual blocks
    time_dim: int = 128              # size of the sinusoidal timestep features (even)
    timesteps: int = 1000            # T; timesteps are 0..T-1
    schedule: str = "cosine"         # "cosine" (Nichol & Dhariwal) or "linear" (Ho et al.)
    objective: str = "v"             # predicted: "v", "eps" (the paper's) or "x0"
    p_uncond: float = 0.1            # condition dropout, for classifier-free guidance (paper: 0)
    direction_embedding: bool = True  # a learned direction vector (False: the paper's shared net)
    switch_every: int = 500          # m: swap condition and target every m steps (paper: 5000 of ~94k)
    ema_decay: float = 0.999         # EMA of the weights used for sampling; 0 turns EMA off
    shrink: bool = True              # fit translate()'s pull toward the condition on validation (False: the paper's)

    def __post_init__(self):
        """Refuse what cannot train (switch_every 0 would divide by zero at the first step)."""
        size = lambda v: type(v) is int and v >= 1
        fraction = (lambda v: hasattr(v, "__float__") and 0 <= v < 1, "a number in [0, 1)")
        checks = {**dict.fromkeys(("dim_a", "dim_b", "hidden", "inner", "depth", "timesteps", "switch_every"),
                                  (size, "an integer >= 1")),
                  "time_dim": (lambda v: size(v) and v % 2 == 0, "an even integer >= 2"),
                  "schedule": (lambda v: v in ("cosine", "linear"), "'cosine' or 'linear'"),
                  "objective": (lambda v: v in ("eps", "x0", "v"), "'eps', 'x0' or 'v'"),
                  "p_uncond": fraction, "ema_decay": fraction,
                  **dict.fromkeys(("direction_embedding", "shrink"), (lambda v: type(v) is bool, "True or False"))}
        for name, (ok, expected) in checks.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"DiffGAPConfig.{name} is {getattr(self, name)!r:.60}; expected {expected}")


# 1. Noise schedule (Ho et al. 2020, eq. 4; Nichol & Dhariwal 2021, eq. 17) ---------------------

def make_schedule(kind: str, T: int) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, (T,) float64: in float32 the
    cumulative product drifts, and alpha_bar_{T-1} of the cosine schedule is ~2e-9."""
    if kind == "linear":
        beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif kind == "cosine":
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + 0.008) / (1 + 0.008) * math.pi / 2) ** 2    # alpha_bar(t) = f(t) / f(0), s = 0.008
        beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)                    # beta_t = 1 - abar_t / abar_{t-1}
    else:
        raise ValueError(f"unknown schedule {kind!r}: use 'cosine' or 'linear'")
    return torch.cumprod(1 - beta, 0)


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


KERNELS = "auto"  # "auto": the Triton kernels for CUDA tensors; "torch": never; "triton": always, errors not fallbacks


def hidden_step(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """silu(h @ W^T + b + temb), the step where the time embedding enters every block:
    h (B, H), W (I, H), b (I,), temb (B, I) -> (B, I). kernels/ fuses it into one Triton launch."""
    if KERNELS not in ("auto", "torch", "triton"):
        raise ValueError(f"KERNELS = {KERNELS!r}: use 'auto', 'torch' or 'triton'")
    if KERNELS == "triton" or (KERNELS == "auto" and h.is_cuda):
        if _fused_step is not None:
            return _fused_step(h, weight, bias, temb, strict=KERNELS == "triton")
        if KERNELS == "triton":
            raise ValueError("KERNELS = 'triton' needs the kernels/ package (and triton) beside diffgap.py")
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


class Denoiser(nn.Module):
    """Predicts eps (or x0, v) for the noisy target x_t given the condition, t and direction. The
    condition's projection joins x_t's at the input (a direct path for the mostly linear map between
    modalities) and, through an MLP, the time (and direction) embedding in every block, as class
    labels do in DDPM. Unequal dims give each modality its own in/out layers."""

    def __init__(self, cfg: DiffGAPConfig):
        super().__init__()
        H, I, dims = cfg.hidden, cfg.inner, (cfg.dim_a, cfg.dim_b)
        n = 1 if cfg.dim_a == cfg.dim_b else 2   # [m] serves modality m; one shared layer when the dims are equal
        self.x_in = nn.ModuleList([nn.Linear(dims[m], H) for m in range(n)])
        self.c_in = nn.ModuleList([nn.Linear(dims[m], H) for m in range(n)])
        self.out = nn.ModuleList([nn.Linear(H, dims[m]) for m in range(n)])
        self.null_cond = nn.Parameter(torch.zeros(H))  # the learned "no condition"
        # sinusoidal features of every timestep 0..T-1, looked up rather than recomputed per call
        self.register_buffer("time_features", timestep_embedding(torch.arange(cfg.timesteps), cfg.time_dim),
                             persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, I), nn.SiLU(), nn.Linear(I, I))
        self.cond_mlp = nn.Sequential(nn.SiLU(), nn.Linear(H, I))
        self.dir_emb = nn.Embedding(2, I) if cfg.direction_embedding else None
        self.blocks = nn.ModuleList([ResidualBlock(H, I) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(H)

    def condition(self, cond, direction: int, drop=None):
        """The condition's two inputs to forward: c (B, H) joins x_t's projection, c_emb (B, I) every
        block. cond (B, D_cond); drop (B,) bool: those rows get the learned null vector instead
        (condition dropout in training, the unconditional half of guidance in sampling)."""
        c = self.c_in[(1 - direction) % len(self.c_in)](cond)                # (B, H)
        if drop is not None:
            c = torch.where(drop[:, None], self.null_cond.expand_as(c), c)
        return c, self.cond_mlp(c)                                            # (B, H), (B, I)

    def forward(self, x_t, t, cond, direction: int):
        """x_t (B, D_target), t (B,) int or one int for every row, cond = condition(...) -> (B, D_target).
        A sampler computes the condition's part once for all its steps."""
        c, c_emb = cond
        emb = self.time_mlp(self.time_features[t].to(x_t.dtype))             # (B, I), or (I,) for one t
        if self.dir_emb is not None:
            emb = emb + self.dir_emb.weight[direction]
        emb = emb + c_emb                                                     # (B, I)
        h = self.x_in[direction % len(self.x_in)](x_t) + c                    # (B, H)
        for block in self.blocks:
            h = block(h, emb)
        return self.out[direction % len(self.out)](self.norm_out(h))          # (B, D_target)


# 3. Diffusion: embedding scaling, training loss, samplers --------------------------------------

class DiffGAP(nn.Module):
    """The denoiser, its EMA copy, the schedule and the per-modality embedding means."""

    def __init__(self, config: DiffGAPConfig):
        super().__init__()
        self.config = config
        self.net = Denoiser(config)
        self.ema = copy.deepcopy(self.net).requires_grad_(False) if config.ema_decay > 0 else None
        # Plain float32 CPU tensors, not buffers: module.to(torch.float16) would round alpha_bar
        # near t = 0 to 1.0, and the samplers divide by 1 - alpha_bar.
        alpha_bar = make_schedule(config.schedule, config.timesteps)
        self.alpha_bar = alpha_bar.float()
        self.sqrt_alpha_bar = alpha_bar.sqrt().float()
        self.sqrt_one_minus_alpha_bar = (1 - alpha_bar).sqrt().float()
        # mean unit embedding per modality, fitted on training data by fit_stats
        self.register_buffer("mean_a", torch.zeros(config.dim_a))
        self.register_buffer("mean_b", torch.zeros(config.dim_b))
        # translate()'s lam of each direction (toward_condition): 1 until fitted on validation (diffgap_eval)
        self.register_buffer("lam", torch.ones(2))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def direction_at(self, step: int) -> int:
        """Bidirectional split training (Algorithm 1): 0 (B->A) for m steps, then 1, then 0..."""
        return (step // self.config.switch_every) % 2

    # -- embedding space <-> diffusion space ---------------------------------------------------
    @torch.no_grad()
    def fit_stats(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Store each modality's mean unit embedding: a (N, D_A), b (M, D_B): tensors, or rows sliceable into them."""
        for x, mean in ((a, self.mean_a), (b, self.mean_b)):
            total = sum(F.normalize(x[i:i + 65536].double(), dim=-1).sum(0) for i in range(0, len(x), 65536))
            mean.copy_(total / len(x))

    def _stats(self, modality: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (self.mean_a, self.mean_b)[modality]
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

    # -- training loss (Algorithm 1, lines 5-8; Ho et al. eq. 14) -------------------------------
    def loss(self, target: torch.Tensor, cond: torch.Tensor, direction: int, t: torch.Tensor, eps: torch.Tensor,
             drop: torch.Tensor | None = None) -> torch.Tensor:
        """MSE of the denoiser: target (B, D_target), cond (B, D_cond) unit norm, t (B,) int in
        0..T-1, eps (B, D_target) noise, drop (B,) bool rows given the null condition (or None)."""
        x0 = self.to_diffusion(target, direction)
        c = self.to_diffusion(cond, 1 - direction)   # the condition gets the same unit-variance scaling
        sa = self.sqrt_alpha_bar.to(t.device)[t][:, None].to(x0.dtype)         # (B, 1)
        so = self.sqrt_one_minus_alpha_bar.to(t.device)[t][:, None].to(x0.dtype)
        x_t = sa * x0 + so * eps                                   # q(x_t | x0), Ho et al. eq. 4
        pred = self.net(x_t, t, self.net.condition(c, direction, drop), direction)
        target_of = {"eps": eps, "x0": x0, "v": sa * eps - so * x0}  # v: Salimans & Ho 2022
        return F.mse_loss(pred, target_of[self.config.objective])

    def forward(self, *args) -> torch.Tensor:  # the training loss: what DistributedDataParallel wraps
        return self.loss(*args)

    # -- sampling -------------------------------------------------------------------------------
    def _x0(self, out: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The x0 a network output implies, from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
        sa, so = float(self.sqrt_alpha_bar[t]), float(self.sqrt_one_minus_alpha_bar[t])
        if self.config.objective == "eps":
            return torch.add(x_t, out, alpha=-so) / sa          # (x_t - so eps) / sa
        if self.config.objective == "x0":
            return out
        return torch.add(sa * x_t, out, alpha=-so)              # v: x0 = sa x_t - so v

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, direction: int, steps: int = 5, sampler: str = "ddim",
               eta: float = 0.0, guidance: float = 1.0, generator=None, use_ema: bool = True,
               project: bool = True) -> torch.Tensor:
        """Generate target-modality embeddings for unit-norm conditions cond (N, D_cond) -> (N, D_target).

        "ddim" (Song et al. 2021, eq. 12) visits ddim_timesteps(T, steps); "ddpm" is ancestral
        sampling (Ho et al. Algorithm 2) over them with the respaced chain's betas. project puts
        each predicted x0 back on the embedding sphere (clipping to [-1, 1] would destroy it).
        """
        if guidance != 1.0 and self.config.p_uncond == 0:
            raise ValueError("guidance != 1 needs a model trained with p_uncond > 0 (no null condition was learned)")
        if sampler not in ("ddim", "ddpm") or not eta >= 0:
            raise ValueError(f"sampler {sampler!r} with eta {eta}: use 'ddim' or 'ddpm' and eta >= 0")
        net = self.ema if (use_ema and self.ema is not None) else self.net
        c = self.to_diffusion(cond.to(self.mean_a.device, self.mean_a.dtype), 1 - direction)
        dim = (self.config.dim_a, self.config.dim_b)[direction]
        x = torch.randn(c.shape[0], dim, generator=generator, device=c.device, dtype=c.dtype)  # x_{T-1}
        n = c.shape[0]   # with guidance, the condition's rows, then the same rows dropped (the null condition)
        cond = net.condition(c, direction) if guidance == 1.0 else \
            net.condition(c.repeat(2, 1), direction, torch.arange(2 * n, device=c.device) >= n)
        ts = ddim_timesteps(self.config.timesteps, steps)
        for i, t in enumerate(ts):
            out = net(x if guidance == 1.0 else x.repeat(2, 1), t, cond, direction)
            if guidance != 1.0:   # classifier-free guidance (Ho & Salimans 2022): null + s (cond - null), one batch
                out = torch.lerp(*out.chunk(2)[::-1], guidance)
            x0 = self._x0(out, x, t)
            if project:
                x0 = self.to_diffusion(self.from_diffusion(x0, direction), direction)
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
        return self.from_diffusion(x, direction)

    @torch.no_grad()
    def sample_many(self, cond: torch.Tensor, direction: int, num_samples: int, max_rows: int = 4096,
                    **sample_kw) -> torch.Tensor:
        """num_samples samples for each condition: cond (N, D_cond) -> (K, N, D_target). Blocks of
        n conditions are sampled as one (K n <= max_rows)-row batch, so memory stays bounded."""
        per_block = max(1, max_rows // num_samples)
        blocks = []
        for i in range(0, max(1, cond.shape[0]), per_block):   # 0 conditions: one empty block, (K, 0, D)
            c = cond[i:i + per_block]                                                  # (n, D_cond)
            x = self.sample(c.repeat(num_samples, 1), direction, **sample_kw)          # (K n, D): sample k = rows k n..
            blocks.append(x.view(num_samples, c.shape[0], x.shape[-1]))
        return torch.cat(blocks, dim=1)

    @torch.no_grad()
    def translate(self, cond: torch.Tensor, direction: int, num_samples: int = 16, max_rows: int = 4096,
                  lam: float | None = None, **sample_kw) -> torch.Tensor:
        """(N, D_cond) -> (N, D_target): the posterior mean E[target | cond], sample_many(...).mean(0) in
        bounded memory, shrunk toward the condition by lam (None: self.lam[direction]; 1: not at all)."""
        n = max(1, max_rows // num_samples)
        mean = torch.cat([self.sample_many(cond[i:i + n], direction, num_samples, max_rows, **sample_kw).mean(0)
                          for i in range(0, max(1, cond.shape[0]), n)])
        lam = float(self.lam[direction]) if lam is None else lam
        return mean if lam == 1 else self.toward_condition(mean, cond, direction, lam)

    def toward_condition(self, x: torch.Tensor, cond: torch.Tensor, direction: int, lam: float) -> torch.Tensor:
        """Translations x (N, D) of cond (N, D) -> from_diffusion(c + lam (x' - c)), (N, D) unit, c and x' their
        diffusion coordinates; lam = 0: the condition moved by the modality gap's mean shift (contrastive, nearly)."""
        c = self.to_diffusion(cond.to(x), 1 - direction)
        return self.from_diffusion(torch.lerp(c, self.to_diffusion(x, direction), lam), direction)

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """p_ema <- d p_ema + (1 - d) p after optimiser step `step`; d = min(decay, (1 + step) / (10 + step))
        warms up so that the first steps' random weights are forgotten quickly."""
        if self.ema is not None:
            d = min(self.config.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p, 1 - d)


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


def train_steps(model: DiffGAP, a: torch.Tensor, b: torch.Tensor, optimizer: torch.optim.Optimizer,
                steps: int, batch_size: int = 64, start_step: int = 0, direction: int | None = None, seed: int = 0,
                share: tuple[int, int] = (0, 1), net=None):
    """Yield {"step", "loss", "direction"} after each optimisation step (the loss a 0-dim tensor).

    a (N, D_A), b (N, D_B) paired rows. Global step s trains on batch s % steps_per_epoch of
    epoch_order(N, epoch, seed), in direction model.direction_at(s) (direction 0 or 1 fixes it),
    with t, eps and the dropout drawn from derived_seed(seed, "step", s): a resumed run continues
    exactly. A non-finite loss raises FloatingPointError before its update. Under torchrun,
    share = (rank, world_size) takes this process's slice of each global batch and its draws, and
    net wraps model in DistributedDataParallel: the run equals one process.
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must be paired row for row, got {len(a)} and {len(b)} rows")
    rank, world = share
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} must be a multiple of the {world} processes")
    mine = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    per_epoch = steps_per_epoch(len(a), batch_size)
    model.train()
    order, order_epoch = None, None
    for step in range(start_step, start_step + steps):
        epoch, pos = divmod(step, per_epoch)
        if epoch != order_epoch:   # the permutation is drawn once per epoch
            order, order_epoch = epoch_order(len(a), epoch, seed), epoch
        idx = order[pos * batch_size:(pos + 1) * batch_size][mine]
        d = model.direction_at(step) if direction is None else direction          # Algorithm 1, line 4
        target, cond = (a, b)[d][idx], (a, b)[1 - d][idx]
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
    suits train.py's ~9k), fused into one kernel for all its tensors where torch has one."""
    fused = next(model.net.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.net.parameters(), lr=lr, fused=fused)
