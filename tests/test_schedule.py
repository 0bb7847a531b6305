"""Schedule golden values (computed here independently, in plain Python floats) and timesteps."""
import math

import pytest
import torch

import diffgap as dg


def test_linear_schedule_golden_values():
    T = 1000
    s = dg.make_schedule("linear", T)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    alpha_bar = []
    prod = 1.0
    for b in betas:
        prod *= 1 - b
        alpha_bar.append(prod)
    for t in (0, 1, 499, 998, 999):
        assert s["beta"][t].item() == pytest.approx(betas[t], rel=1e-6)
        assert s["alpha_bar"][t].item() == pytest.approx(alpha_bar[t], rel=1e-5)
    # well-known value: the linear schedule ends at alpha_bar_T ~ 4.04e-5
    assert s["alpha_bar"][-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert all(v.dtype == torch.float32 and v.shape == (T,) for v in s.values())


def test_cosine_schedule_golden_values():
    T, eps = 1000, 0.008
    f = lambda t: math.cos((t / T + eps) / (1 + eps) * math.pi / 2) ** 2
    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    prod, alpha_bar = 1.0, []
    for b in betas:
        prod *= 1 - b
        alpha_bar.append(prod)
    s = dg.make_schedule("cosine", T)
    for t in (0, 10, 500, 900, 998):
        assert s["alpha_bar"][t].item() == pytest.approx(alpha_bar[t], rel=1e-5)
        # before clipping, alpha_bar_t is f(t+1)/f(0)
        assert s["alpha_bar"][t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    assert s["beta"][-1].item() == pytest.approx(0.999)  # the clip at the end of the schedule
    assert s["alpha_bar"][-1].item() == pytest.approx(alpha_bar[-1], rel=1e-5)
    assert s["alpha_bar"][-1].item() < 1e-8
    assert s["alpha_bar_prev"][0].item() == 1.0
    post = s["beta"] * (1 - s["alpha_bar_prev"]) / (1 - s["alpha_bar"])
    assert torch.allclose(s["posterior_variance"], post)
    assert s["posterior_variance"][0].item() == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_are_computed_in_float64(kind):
    """Every value is the float64 result rounded once to float32: a float32 cumulative product
    would drift by ~1e-5 relative over 1000 steps (and alpha_bar_{T-1} of cosine is ~6e-9)."""
    T = 1000
    if kind == "linear":
        betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    else:
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    s = dg.make_schedule(kind, T)
    prod = 1.0
    for t, b in enumerate(betas):
        prev, prod = prod, prod * (1 - b)
        if t % 37 == 0 or t >= T - 2:
            assert s["alpha"][t].item() == pytest.approx(1 - b, rel=1e-7, abs=0)
            assert s["alpha_bar"][t].item() == pytest.approx(prod, rel=1e-7, abs=0)
            assert s["alpha_bar_prev"][t].item() == pytest.approx(prev, rel=1e-7, abs=0)
            assert s["sqrt_alpha_bar"][t].item() == pytest.approx(math.sqrt(prod), rel=1e-7, abs=0)
            assert s["sqrt_one_minus_alpha_bar"][t].item() == pytest.approx(math.sqrt(1 - prod), rel=1e-7, abs=0)
    assert sorted(s) == sorted(["beta", "alpha", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar",
                                "sqrt_one_minus_alpha_bar", "posterior_variance"])


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
