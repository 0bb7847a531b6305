"""Schedule golden values (computed here independently, in plain Python floats) and timesteps."""
import math

import pytest
import torch

import diffgap as dg


def betas_of(alpha_bar):
    """beta_t = 1 - abar_t / abar_{t-1}, with abar_{-1} = 1."""
    return 1 - alpha_bar / torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])


def test_linear_schedule_golden_values():
    T = 1000
    ab = dg.make_schedule("linear", T)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    alpha_bar = []
    prod = 1.0
    for b in betas:
        prod *= 1 - b
        alpha_bar.append(prod)
    for t in (0, 1, 499, 998, 999):
        assert betas_of(ab)[t].item() == pytest.approx(betas[t], rel=1e-9)
        assert ab[t].item() == pytest.approx(alpha_bar[t], rel=1e-9)
    # well-known value: the linear schedule ends at alpha_bar_T ~ 4.04e-5
    assert ab[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert ab.dtype == torch.float64 and ab.shape == (T,)


def test_cosine_schedule_golden_values():
    T, eps = 1000, 0.008
    f = lambda t: math.cos((t / T + eps) / (1 + eps) * math.pi / 2) ** 2
    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    prod, alpha_bar = 1.0, []
    for b in betas:
        prod *= 1 - b
        alpha_bar.append(prod)
    ab = dg.make_schedule("cosine", T)
    for t in (0, 10, 500, 900, 998):
        assert ab[t].item() == pytest.approx(alpha_bar[t], rel=1e-9)
        # before clipping, alpha_bar_t is f(t+1)/f(0)
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas_of(ab)[-1].item() == pytest.approx(0.999)  # the clip at the end of the schedule
    assert betas_of(ab)[:-1].max().item() < 0.999
    assert ab[-1].item() == pytest.approx(alpha_bar[-1], rel=1e-9)
    assert ab[-1].item() < 1e-8


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_model_holds_the_float64_schedule_rounded_once(kind):
    """The samplers and the loss read float32 tables, each the float64 value rounded once: a float32
    cumulative product would drift by ~1e-5 relative over 1000 steps (alpha_bar_{T-1} of cosine is ~6e-9)."""
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1, schedule=kind))
    ab = dg.make_schedule(kind, 1000)
    for name, want in (("alpha_bar", ab), ("sqrt_alpha_bar", ab.sqrt()), ("sqrt_one_minus_alpha_bar", (1 - ab).sqrt())):
        got = getattr(model, name)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and torch.equal(got, want.float()), name
    assert not any("alpha" in k for k in model.state_dict())   # recomputed, not stored in checkpoints


def test_timestep_embedding_is_the_sinusoidal_one():
    """[cos(t w_i), sin(t w_i)], w_i = 10000^(-i / half), i < half = dim / 2 (Vaswani et al.)."""
    t = torch.tensor([0, 1, 17, 999])
    emb = dg.timestep_embedding(t, 8)
    assert emb.shape == (4, 8)
    for row, step in zip(emb, t.tolist()):
        w = [10000 ** (-i / 4) for i in range(4)]
        want = [math.cos(step * x) for x in w] + [math.sin(step * x) for x in w]
        assert row.tolist() == pytest.approx(want, abs=1e-4)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        dg.make_schedule("sigmoid", 10)


def test_ddim_timesteps():
    assert dg.ddim_timesteps(1000, 5) == [999, 799, 599, 399, 199]
    assert dg.ddim_timesteps(1000, 1) == [999]
    assert dg.ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert dg.ddim_timesteps(10, 3) == [9, 6, 3]
    for steps in range(1, 51):
        ts = dg.ddim_timesteps(50, steps)
        assert len(ts) == steps and ts[0] == 49 and min(ts) >= 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            dg.ddim_timesteps(1000, bad)
