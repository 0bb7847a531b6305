"""Samplers with an oracle denoiser: a full no-noise loop must return the x0 it started from."""
import pytest
import torch

import diffgap as dg


def tiny_config(**kw):
    base = dict(dim_a=16, dim_b=16, hidden=32, inner=16, depth=1, time_dim=16, ema_decay=0.0)
    base.update(kw)
    return dg.DiffGAPConfig(**base)


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
    out = model.sample(cond, 0, steps=steps, sampler=sampler, eta=0.0, generator=g, project=project,
                       denoise_fn=oracle_for(model, x0, objective))
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
    cond_pred = model.net(x, t, c, 0)
    null_pred = model.net(x, t, c, 0, torch.ones(5, dtype=torch.bool))
    assert not torch.allclose(cond_pred, null_pred)
    predict = lambda s: model._predict(model.net, x, 400, model._condition(model.net, c, 0, s), 0, s)
    assert torch.allclose(predict(1.0), cond_pred)
    assert torch.allclose(predict(3.0), null_pred + 3.0 * (cond_pred - null_pred), atol=1e-5)
    # dropping only some rows leaves the others' predictions unchanged
    mixed = model.net(x, t, c, 0, torch.tensor([True, False, True, False, False]))
    assert torch.allclose(mixed[1], cond_pred[1]) and torch.allclose(mixed[0], null_pred[0])


def test_guidance_refused_without_condition_dropout():
    model = dg.DiffGAP(tiny_config(p_uncond=0.0))
    with pytest.raises(ValueError, match="p_uncond"):
        model.sample(torch.randn(2, 16), 0, guidance=2.0)
