"""Triton kernels against their torch references (on the CPU: under Triton's interpreter).

Tolerances: fp32 1e-5 (the kernel accumulates in fp32 like torch); fp16 2e-2 absolute on
values of order 1 (one fp16 rounding of the output and of dz, then torch's fp16 matmuls);
bf16 6e-2 (8-bit mantissa; the interpreter also truncates fp32->bf16 instead of rounding).
"""
import importlib

import pytest
import torch

import diffgap as dg

kernels = pytest.importorskip("kernels")
from kernels.cosine_topk import cosine_topk_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def make_inputs(M, K, N, dtype, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(N, generator=g).to(dtype).requires_grad_()
    t = torch.randn(*((M, N) if rows else (N,)), generator=g).to(dtype).requires_grad_()
    return x, w, b, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("shape", [(37, 123, 77), (64, 32, 16), (5, 200, 130)])
def test_fused_step_forward_and_gradients(dtype, rows, shape):
    inputs = make_inputs(*shape, dtype, rows)
    y = kernels.fused_linear_temb_silu(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y.backward(dy)
    grads = [p.grad.float() for p in inputs]
    ref_inputs = [p.detach().float().requires_grad_() for p in inputs]
    y_ref = kernels.fused_linear_temb_silu_reference(*ref_inputs)
    y_ref.backward(dy.float())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (shape[0], shape[2])
    assert torch.allclose(y.float(), y_ref, atol=tol, rtol=tol)
    for name, got, p in zip("x W b temb".split(), grads, ref_inputs):
        scale = max(1.0, p.grad.abs().max().item())  # db sums over rows: compare relative to its size
        assert torch.allclose(got, p.grad, atol=tol * scale, rtol=tol), name


def test_fused_step_gradcheck_fp64():
    inputs = [p.detach().double().requires_grad_() for p in make_inputs(6, 5, 4, torch.float64, rows=True)]
    assert torch.autograd.gradcheck(kernels.fused_linear_temb_silu, inputs, eps=1e-6, atol=1e-5)
    inputs[3] = inputs[3][0].detach().requires_grad_()   # broadcast temb
    assert torch.autograd.gradcheck(kernels.fused_linear_temb_silu, inputs, eps=1e-6, atol=1e-5)


def test_fused_step_without_grad_stores_nothing_extra():
    x, w, b, t = (p.detach() for p in make_inputs(8, 16, 8, torch.float32, rows=True))
    with torch.no_grad():
        y = kernels.fused_linear_temb_silu(x, w, b, t)
    assert not y.requires_grad
    assert torch.allclose(y, kernels.fused_linear_temb_silu_reference(x, w, b, t), atol=1e-5)


def test_fused_step_rejects_bad_shapes():
    x, w, b, t = (p.detach() for p in make_inputs(8, 16, 8, torch.float32, rows=True))
    with pytest.raises(ValueError, match="temb"):
        kernels.fused_linear_temb_silu(x, w, b, t[:, :3])
    with pytest.raises(ValueError, match="do not fit"):
        kernels.fused_linear_temb_silu(x[:, :5], w, b, t)


def gallery_with_ties_and_zeros(M, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, gal = torch.randn(M, D, generator=g), torch.randn(N, D, generator=g)
    gal[N // 3] = gal[N // 5]            # duplicate rows: equal scores, lower index must win
    gal[N // 2] = 2.5 * gal[N // 5]      # same direction, another norm: equal cosine too
    gal[N - 1] = 0                        # zero vector: cosine 0, not NaN
    q[0] = 0
    return q, gal


@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("shape", [(19, 300, 70), (40, 129, 33)])
def test_cosine_topk_kernel_matches_full_matrix(k, shape):
    q, gal = gallery_with_ties_and_zeros(*shape)
    v, i = cosine_topk_triton(q, gal, k)
    v_ref, i_ref = kernels.cosine_topk_reference(q, gal, k)
    assert torch.equal(i, i_ref)
    assert torch.allclose(v, v_ref, atol=1e-5) and not torch.isnan(v).any()
    # the values are the cosines of the returned indices
    cos = torch.nn.functional.cosine_similarity(q[:, None, :], gal[i], dim=-1)
    assert torch.allclose(v[1:], cos[1:], atol=1e-5)   # row 0 is the zero query: all 0
    assert (v[0] == 0).all()


def test_cosine_topk_k_larger_than_a_block_and_several_slices():
    q, gal = gallery_with_ties_and_zeros(9, 700, 20, seed=3)
    v, i = cosine_topk_triton(q, gal, 40, slice_len=128)   # 6 slices, k > 32 rows of a block
    v_ref, i_ref = kernels.cosine_topk_reference(q, gal, 40)
    assert torch.equal(i, i_ref) and torch.allclose(v, v_ref, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 10, 64])
def test_chunked_torch_path_matches_full_matrix(k):
    q, gal = gallery_with_ties_and_zeros(31, 1000, 24, seed=1)
    v, i = kernels.cosine_topk_torch(q, gal, k, budget_bytes=4 * 31 * 100)   # 10 chunks
    v_ref, i_ref = kernels.cosine_topk_reference(q, gal, k)
    assert torch.equal(i, i_ref) and torch.allclose(v, v_ref, atol=1e-6)


def test_chunked_torch_path_memory_is_bounded_by_the_chunk(monkeypatch):
    """Peak extra memory follows the chunk budget, not M x N: every score block made is one chunk's."""
    topk_mod = importlib.import_module("kernels.cosine_topk")
    shapes, real = [], topk_mod._chunk_topk

    def spy(s, k):
        shapes.append(tuple(s.shape))
        return real(s, k)

    monkeypatch.setattr(topk_mod, "_chunk_topk", spy)
    q, gal = torch.randn(50, 16), torch.randn(20000, 16)
    v, i = kernels.cosine_topk_torch(q, gal, 10, budget_bytes=4 * 50 * 1024)      # chunks of 1,024 rows
    assert shapes == [(50, 1024)] * 19 + [(50, 20000 - 19 * 1024)]
    assert torch.equal(i, kernels.cosine_topk_reference(q, gal, 10)[1])


def test_streaming_retrieval_metrics_equal_the_dense_ones():
    q, gal = gallery_with_ties_and_zeros(60, 250, 16, seed=2)
    gal[125] = gal[50]  # exact duplicates only: a rescaled copy ties only up to rounding, which
    q[0] = gal[7]       # the dense and streamed paths need not round alike
    single = torch.randint(0, 250, (60,), generator=torch.Generator().manual_seed(0))
    multi = torch.zeros(60, 250, dtype=torch.bool)
    multi[torch.arange(60), single] = True
    multi[torch.arange(60), (single * 7) % 250] = True
    for rel in (single, multi):
        dense = dg.retrieval_metrics(dg.cosine_scores(q, gal), rel)
        streamed = dg.retrieval_metrics_from_embeddings(q, gal, rel, chunk=37)
        assert dense.keys() == streamed.keys()
        for key in dense:
            assert streamed[key] == pytest.approx(dense[key], abs=1e-6), key


def test_end_to_end_triton_matches_torch():
    """One training step and a 5-step sample agree between kernels 'triton' (interpreter) and 'torch'."""
    results = {}
    for mode in ("torch", "triton"):
        dg.KERNELS = mode
        try:
            torch.manual_seed(0)
            model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=24, dim_b=24, hidden=32, inner=16, depth=2, time_dim=16))
            with torch.no_grad():
                for blk in model.net.blocks:   # non-zero second layers, so the blocks matter
                    blk.fc2.weight.normal_(0, 0.2)
            a, b = torch.randn(16, 24), torch.randn(16, 24)
            opt = dg.make_optimizer(model, 1e-2)
            loss = next(dg.train_steps(model, a, b, opt, 1, 16, seed=0))["loss"].item()
            out = model.sample(b[:6], 0, steps=5, use_ema=False, generator=torch.Generator().manual_seed(0))
            results[mode] = (loss, out, [p.detach().clone() for p in model.net.parameters()])
        finally:
            dg.KERNELS = "auto"
    (l0, o0, p0), (l1, o1, p1) = results["torch"], results["triton"]
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert torch.allclose(o0, o1, atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(p0, p1))
