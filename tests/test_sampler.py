"""Samplers with an oracle denoiser: a full no-noise loop must return the x0 it started from."""
import copy
import math

import pytest
import torch

import diffgap as dg


def tiny_config(**kw):
    base = dict(dim_a=16, dim_b=16, hidden=32, inner=16, depth=1, time_dim=16, ema_decay=0.0)
    base.update(kw)
    return dg.DiffGAPConfig(**base)


def use_denoiser(model, denoise):
    """Replace the network by denoise(x_t, t, cond, direction), e.g. an oracle (the models here have no EMA)."""
    model.net.forward = lambda x_t, t, cond, direction: denoise(x_t, t, cond, direction)


def oracle_for(model, x0, objective):
    """A denoiser that knows x0: returns the exact eps / x0 / v for any x_t."""
    def denoise(x_t, t, cond, direction):
        sa, so = model.sqrt_alpha_bar[t], model.sqrt_one_minus_alpha_bar[t]
        eps = (x_t - sa * x0) / so
        return {"eps": eps, "x0": x0, "v": sa * eps - so * x0}[objective]
    return denoise


# float64: at t = T-1 the cosine schedule has alpha_bar ~ 6e-9, so recovering x0 from an eps
# prediction divides by sqrt(alpha_bar) ~ 8e-5; in float32 that rounding alone is ~1e-3.
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 1), ("ddim", 5), ("ddim", 50), ("ddim", 1000), ("ddpm", 1000)])
@pytest.mark.parametrize("schedule,project", [("cosine", False), ("linear", False), ("cosine", True)])
def test_oracle_denoiser_recovers_x0(objective, sampler, steps, schedule, project):
    torch.manual_seed(0)
    model = dg.DiffGAP(tiny_config(objective=objective, schedule=schedule)).double()
    a = torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64) + 2.0, dim=-1)
    model.fit_stats(a, a)  # a non-zero mean, so centring and scaling are exercised too
    target = torch.nn.functional.normalize(torch.randn(6, 16, dtype=torch.float64) + 1.0, dim=-1)
    cond = torch.randn(6, 16, dtype=torch.float64)
    x0 = model.to_diffusion(target, 0)
    g = torch.Generator().manual_seed(1)
    use_denoiser(model, oracle_for(model, x0, objective))
    out = model.sample(cond, 0, steps=steps, sampler=sampler, eta=0.0, generator=g, project=project)
    cos = torch.nn.functional.cosine_similarity(out, target, dim=-1)
    assert cos.min().item() > 0.9999
    assert (out - target).abs().max().item() < 1e-3


def test_ddim_eta_one_is_ddpm_on_the_same_timesteps():
    """DDIM with eta = 1 has the respaced DDPM posterior's mean and variance (Song et al. sec. 4.1)."""
    torch.manual_seed(0)
    model = dg.DiffGAP(tiny_config()).double()
    cond = torch.randn(5, 16, dtype=torch.float64)
    outs = [model.sample(cond, 1, steps=7, sampler=s, eta=1.0, generator=torch.Generator().manual_seed(3))
            for s in ("ddim", "ddpm")]
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    # and eta = 0 is deterministic given the starting noise but differs from eta = 1
    ddim0 = model.sample(cond, 1, steps=7, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(ddim0, outs[0], atol=1e-3)


def test_sample_shapes_unit_norm_and_caller_tensor_untouched():
    model = dg.DiffGAP(tiny_config(dim_a=16, dim_b=24))
    cond = torch.randn(4, 24)
    before = cond.clone()
    out = model.sample(cond, 0, steps=3)
    assert out.shape == (4, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(cond, before)
    assert model.sample(torch.randn(3, 16), 1, steps=2).shape == (3, 24)


def test_classifier_free_guidance():
    torch.manual_seed(0)
    model = dg.DiffGAP(tiny_config(p_uncond=0.1))
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0, 0.3)
    x, c = torch.randn(5, 16), torch.randn(5, 16)
    t = torch.full((5,), 400)
    net = lambda drop=None: model.net(x, t, model.net.condition(c, 0, drop), 0)
    cond_pred, null_pred = net(), net(torch.ones(5, dtype=torch.bool))
    assert not torch.allclose(cond_pred, null_pred)
    # one DDIM step lands on the x0 of the guided prediction null + s (cond - null), from x_{T-1} ~ N(0, I)
    c_unit = torch.nn.functional.normalize(c, dim=-1)
    for s in (1.0, 3.0):
        got = model.sample(c_unit, 0, steps=1, guidance=s, project=False, use_ema=False,
                           generator=torch.Generator().manual_seed(1))
        x_T, cd = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), model.to_diffusion(c_unit, 1)
        pred = lambda drop=None: model.net(x_T, 999, model.net.condition(cd, 0, drop), 0)
        guided = pred(torch.ones(5, dtype=torch.bool)) + s * (pred() - pred(torch.ones(5, dtype=torch.bool)))
        assert torch.allclose(got, model.from_diffusion(model._x0(guided, x_T, 999), 0), atol=1e-5), s
    # dropping only some rows leaves the others' predictions unchanged
    mixed = net(torch.tensor([True, False, True, False, False]))
    assert torch.allclose(mixed[1], cond_pred[1]) and torch.allclose(mixed[0], null_pred[0])


def test_guidance_refused_without_condition_dropout():
    model = dg.DiffGAP(tiny_config(p_uncond=0.0))
    with pytest.raises(ValueError, match="p_uncond"):
        model.sample(torch.randn(2, 16), 0, guidance=2.0)


@pytest.mark.parametrize("kw", [dict(eta=-1.0), dict(eta=float("nan")), dict(sampler="euler")])
def test_a_sampler_setting_outside_ddim_and_ddpm_is_refused(kw):
    with pytest.raises(ValueError, match="use 'ddim' or 'ddpm' and eta >= 0"):
        dg.DiffGAP(tiny_config()).sample(torch.randn(2, 16), 0, **kw)


# -- every step of every sampler against closed forms on Gaussian data ------------------------------
# For data x0 ~ N(mu, s^2 I) the exact denoiser is closed form at every t: with x_t = sa x0 + so eps
# (sa^2 = alpha_bar_t, so^2 = 1 - alpha_bar_t), x_t ~ N(sa mu, v_t I), v_t = sa^2 s^2 + so^2, and
# E[x0 | x_t] = mu + (sa s^2 / v_t) (x_t - sa mu), E[eps | x_t] = (x_t - sa E[x0 | x_t]) / so. Each
# sampler step is then affine in x_t plus independent noise, so the law of every intermediate x_t
# is a Gaussian whose mean and variance follow by scalar recursion: the test checks each step's
# samples against it (and each step's residual noise against its variance), not only the last one.
MU_S = (torch.linspace(-1.0, 1.0, 16, dtype=torch.float64), 0.5)


def step_law(sampler, eta, ab, ab_prev, final):
    """(mean_fn, sigma) of one step x_t -> x_prev with the exact posterior-mean denoiser: the
    mean of x_prev given x_t (Song et al. 2021 eq. 12 for DDIM; Ho et al. 2020 eq. 7 for DDPM,
    with the respaced beta = 1 - abar_t / abar_prev) and the standard deviation of its noise."""
    mu, s = MU_S
    sa, so = math.sqrt(ab), math.sqrt(1 - ab)
    v = ab * s * s + 1 - ab

    def x0_of(x):
        return mu + sa * s * s / v * (x - sa * mu)

    if sampler == "ddim":
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        mean = lambda x: (math.sqrt(ab_prev) * x0_of(x)
                          + math.sqrt(1 - ab_prev - sigma ** 2) * (x - sa * x0_of(x)) / so)
    else:
        beta = 1 - ab / ab_prev
        sigma = math.sqrt(beta * (1 - ab_prev) / (1 - ab))
        mean = lambda x: (math.sqrt(ab_prev) * beta * x0_of(x) + math.sqrt(1 - beta) * (1 - ab_prev) * x) / (1 - ab)
    return mean, 0.0 if final else sigma


class GaussianOracle:
    """A denoiser with the exact eps / x0 / v for N(mu, s^2 I) data; checks every transition
    between consecutive calls (and into the output) against step_law, and each call's x_t
    against the law the recursion predicts for it."""

    def __init__(self, model, objective, sampler, eta):
        self.model, self.objective, self.sampler, self.eta = model, objective, sampler, eta
        self.ts, self.prev = [], None
        self.mean, self.var = torch.zeros_like(MU_S[0]), 1.0     # x_{T-1} ~ N(0, I), as the sampler starts
        self.laws = []                                            # (t, law mean, law var) of each x_t

    def check(self, x, law_mean, law_var, what):
        n = x.numel()
        z = (x - law_mean) / math.sqrt(law_var)
        assert abs(z.mean().item()) < 5.5 / math.sqrt(n), f"{what}: mean off the closed form"
        assert abs(z.var().item() - 1) < 5.5 * math.sqrt(2 / n), f"{what}: variance off the closed form"

    def transition(self, x_next, t_next):
        t, x = self.prev
        ab = float(self.model.alpha_bar[t])
        ab_prev = 1.0 if t_next is None else float(self.model.alpha_bar[t_next])
        mean, sigma = step_law(self.sampler, self.eta, ab, ab_prev, final=t_next is None)
        r = x_next - mean(x)                               # the step's own noise
        what = f"step {t} -> {t_next}"
        if sigma == 0:
            assert (r.abs().max() / (1 + x.abs().max())).item() < 1e-6, f"{what}: not the deterministic update"
        else:
            n = r.numel()
            z = r / sigma
            assert abs(z.mean().item()) < 5.5 / math.sqrt(n), f"{what}: noise mean"
            assert abs(z.var().item() - 1) < 5.5 * math.sqrt(2 / n), f"{what}: noise variance is not sigma^2"
            corr = ((z - z.mean()) * (x - x.mean())).mean() / (z.std() * x.std())
            assert abs(corr.item()) < 5.5 / math.sqrt(n), f"{what}: noise correlates with x_t (wrong mean update)"
        a = (mean(self.mean + 1) - mean(self.mean)).mean().item()     # the step's slope on x_t
        self.mean, self.var = mean(self.mean), a * a * self.var + sigma ** 2
        self.check(x_next, self.mean, self.var, f"x after {what}")

    def __call__(self, x_t, t, cond, direction):
        if self.prev is None:
            self.check(x_t, self.mean, self.var, "x_T")
        else:
            self.transition(x_t, t)
        self.ts.append(t)
        self.laws.append((t, self.mean.clone(), self.var))
        self.prev = (t, x_t.clone())
        mu, s = MU_S
        ab = float(self.model.alpha_bar[t])
        # the sampler's own float32 sqrt tables: at t = T-1 it divides by sa ~ 8e-5, so the oracle's
        # eps must agree with them to the last bit for its x0 to come back to 1e-12
        sa, so = float(self.model.sqrt_alpha_bar[t]), float(self.model.sqrt_one_minus_alpha_bar[t])
        x0 = mu + sa * s * s / (ab * s * s + 1 - ab) * (x_t - sa * mu)
        eps = (x_t - sa * x0) / so
        return {"eps": eps, "x0": x0, "v": sa * eps - so * x0}[self.objective]


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 5, 0.0), ("ddim", 50, 0.0), ("ddim", 20, 0.5),
                                               ("ddpm", 1000, 1.0), ("ddpm", 10, 1.0)])
def test_every_step_has_the_closed_form_law_on_gaussian_data(objective, sampler, steps, eta):
    model = dg.DiffGAP(tiny_config(objective=objective)).double()
    model.from_diffusion = lambda x, modality: x            # read the samples in diffusion space
    oracle = GaussianOracle(model, objective, sampler, eta)
    use_denoiser(model, oracle)
    out = model.sample(torch.randn(2000, 16, dtype=torch.float64), 0, steps=steps, sampler=sampler, eta=eta,
                       project=False, generator=torch.Generator().manual_seed(0))
    assert oracle.ts == dg.ddim_timesteps(1000, steps)      # every requested step, in order
    oracle.transition(out, None)                            # the last step lands on E[x0 | x_t]
    mu, s = MU_S
    # the law the steps predict approaches the data's: closely for many steps; with few, each step
    # shrinks the spread (with the posterior mean for x0, a deterministic DDIM step scales x_t - mean
    # by (sa' sa s^2 + so' so) / v_t <= sqrt(v_t' / v_t), Cauchy-Schwarz): 5 DDIM steps lose 28% of s
    final_sd = math.sqrt(oracle.var)
    assert torch.allclose(oracle.mean, mu, atol=1e-3)
    if steps >= 50:
        assert abs(final_sd / s - 1) < 0.04
        for t, mean, var in oracle.laws:                    # and every x_t's law is close to q(x_t)
            ab = float(model.alpha_bar[t])
            assert torch.allclose(mean, math.sqrt(ab) * mu, atol=1e-3)
            assert abs(var / (ab * s * s + 1 - ab) - 1) < (0.01 if sampler == "ddpm" else 0.07)
    else:
        assert 0.6 < final_sd / s < 0.95


def test_sampling_uses_the_ema_weights_unless_told_not_to():
    torch.manual_seed(0)
    model = dg.DiffGAP(tiny_config(ema_decay=0.9))
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0, 0.3)                               # net and EMA now differ
    as_net, as_ema = copy.deepcopy(model), copy.deepcopy(model)
    as_net.ema.load_state_dict(model.net.state_dict())     # its EMA holds the raw weights
    as_ema.net.load_state_dict(model.ema.state_dict())     # its raw weights are the EMA
    cond = torch.randn(6, 16)
    draw = lambda m, **kw: m.sample(cond, 0, steps=4, generator=torch.Generator().manual_seed(2), **kw)
    assert not torch.equal(draw(model), draw(model, use_ema=False))
    assert torch.equal(draw(model), draw(as_ema, use_ema=False))
    assert torch.equal(draw(model, use_ema=False), draw(as_net))
