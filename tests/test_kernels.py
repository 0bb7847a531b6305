"""The Triton kernels against their torch references: on CUDA tensors when a GPU is present
(benchmarks/gpu_check.py runs this file there), otherwise on the CPU under Triton's interpreter.

Tolerances (kernels.TOL, which the first-use check uses too): fp32 1e-5 (the kernels accumulate in fp32
like torch); fp16 2e-2 absolute on values of order 1 (one rounding of the output and of dz, then torch's
fp16 matmuls); bf16 6e-2 (8-bit mantissa; the interpreter also truncates fp32 -> bf16).

Kernel tests call the kernels' own launchers, not the public functions (whose first-use check would
fall back to torch on a failing kernel), and the `launches` fixture proves each launched its kernel.
"""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffgap as dg
import diffgap_eval as ev

kernels = pytest.importorskip("kernels")
fused_mlp, topk = kernels.fused_mlp, kernels.topk
if fused_mlp is None:
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}
assert all(kernels.TOL[d] == t for d, t in TOL.items())   # the check uses the tests' tolerances


def fused(x, w, b, t):
    """The fused step through its kernels only: errors raise, nothing falls back to torch."""
    return fused_mlp.FusedLinearTembSiLU.apply(x, w, b, t, None)


class Counting:
    """Stands in for a @triton.jit kernel: counts launches, keeps their keyword arguments, runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.kwargs = kernel, 0, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return run


@pytest.fixture
def launches(monkeypatch):
    """{"fused_fwd", "fused_bwd", "cosine_topk"} -> Counting wrappers of the kernels for one test."""
    out = {}
    for mod, attr, name in ((fused_mlp, "_fused_fwd_kernel", "fused_fwd"), (fused_mlp, "_fused_bwd_kernel", "fused_bwd"),
                            (topk, "_cosine_topk_kernel", "cosine_topk")):
        out[name] = Counting(getattr(mod, attr))
        monkeypatch.setattr(mod, attr, out[name])
    return out


def make_inputs(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    b, t = torch.randn(N, generator=g), torch.randn(M, N, generator=g)
    return [a.to(DEVICE, dtype).requires_grad_() for a in (x, w, b, t)]


# (150, 200, 300): several row, column and K tiles at the GPU config (64x64x32) and the interpreter's
# (64x128x128); the others: ragged edges, one tile, fewer than 16 rows, K and N not multiples of 16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 123, 77), (64, 32, 16), (5, 200, 130), (150, 200, 300)])
def test_fused_step_forward_and_gradients(dtype, shape, launches):
    inputs = make_inputs(*shape, dtype)
    y = fused(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y.backward(dy)
    assert launches["fused_fwd"].launches == 1 and launches["fused_bwd"].launches == 1
    ref_inputs = [p.detach().float().requires_grad_() for p in inputs]
    y_ref = kernels.fused_linear_temb_silu_reference(*ref_inputs)
    y_ref.backward(dy.float())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (shape[0], shape[2])
    assert torch.allclose(y.float(), y_ref, atol=tol, rtol=tol)
    for name, p, r in zip("x W b temb".split(), inputs, ref_inputs):
        scale = max(1.0, r.grad.abs().max().item())  # db sums over rows: compare relative to its size
        assert torch.allclose(p.grad.float(), r.grad, atol=tol * scale, rtol=tol), name


def test_fused_step_gradcheck_fp64(launches):
    inputs = [p.detach().double().requires_grad_() for p in make_inputs(6, 5, 4, torch.float64)]
    assert torch.autograd.gradcheck(fused, inputs, eps=1e-6, atol=1e-5)
    assert launches["fused_fwd"].launches > 0 and launches["fused_bwd"].launches > 0
    # fp64 all the way (the column sums too): torch's fp64 gradients to ~1e-15, where gradcheck's
    # finite differences could not tell an fp32 sum from an fp64 one
    ins = [p.detach().double().requires_grad_() for p in make_inputs(130, 40, 150, torch.float64)]
    got = torch.autograd.grad(fused(*ins).sum(), ins)
    want = torch.autograd.grad(kernels.fused_linear_temb_silu_reference(*ins).sum(), ins)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=1e-12) for a, b in zip(got, want))


def test_fused_step_without_grad_stores_no_z(launches):
    """Sampling: under no_grad the kernel stores y alone, though the weights require grad (autograd's
    needs_input_grad says True there too); with grad it stores z for the backward."""
    x, w, b, t = make_inputs(80, 16, 144, torch.float32)
    kernels.fused_linear_temb_silu(x, w, b, t)            # the first-use check, if it runs, launches too
    with torch.no_grad():
        y = kernels.fused_linear_temb_silu(x, w, b, t)
    assert not y.requires_grad and [k["STORE_Z"] for k in launches["fused_fwd"].kwargs[-2:]] == [True, False]
    assert torch.allclose(y, kernels.fused_linear_temb_silu_reference(x, w, b, t), atol=1e-5)


def test_fused_step_takes_views_and_an_expanded_temb(launches):
    """Non-contiguous inputs (a column slice, a transposed weight, one temb row expanded) give the same step."""
    x, w, b, t = (a.detach() for a in make_inputs(40, 64, 48, torch.float32))
    args = (torch.cat([x, x], 1)[:, ::2], w.T.contiguous().T, b, t[:1].expand(40, 48))
    y = kernels.fused_linear_temb_silu(*args, strict=True)
    assert launches["fused_fwd"].launches >= 1
    assert torch.allclose(y, kernels.fused_linear_temb_silu_reference(*args), atol=1e-5)


def test_cosine_topk_takes_the_kernel_where_it_should(launches):
    """backend "auto": the kernel for CUDA tensors only; "triton": the kernel up to k = K_MAX (the
    first-use check launches it too, once), the torch path beyond."""
    q, g = gallery_with_ties_and_zeros(12, 200, 16, seed=8)
    count = lambda: launches["cosine_topk"].launches
    kernels.cosine_topk(q, g, 5)
    assert (count() > 0) == (DEVICE.type == "cuda")         # CPU tensors: no launch at all
    before = count()
    v, i = kernels.cosine_topk(q, g, kernels.K_MAX, backend="triton")
    assert count() > before
    assert_topk_by_numpy(v, i, q, g, kernels.K_MAX)
    before = count()
    v, i = kernels.cosine_topk(q, g, kernels.K_MAX + 1, backend="triton")
    assert count() == before and i.shape == (12, kernels.K_MAX + 1)
    assert kernels.cosine_topk(q, g, 1, backend="torch")[1].shape == (12, 1)
    v, i = kernels.cosine_topk(q, g, 500, backend="triton")   # k capped at N
    assert count() == before and i.shape == (12, 200)


def test_the_top_k_check_input_is_what_its_docstring_says():
    """Entries -1, 0, 1; 16 non-zeros (norm 4) per gallery row; query 0 and gallery row N - 1 zero;
    exact ties present: the first-use check's claims rest on these."""
    q, g = topk.check_input()
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0} and set(g.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert (q[0] == 0).all() and (g[-1] == 0).all()
    assert ((g[:-1] != 0).sum(1) == 16).all() and q[1:].abs().sum(1).min() > 0
    top = (q[1:] @ g.T).sort(dim=1, descending=True).values
    assert (top[:, 9] == top[:, 10]).any()                  # ties across the k-th place


def test_what_does_not_fit_is_a_value_error_naming_it():
    q, g = torch.randn(4, 8), torch.randn(5, 8)
    for args, first, shape in (((q, torch.randn(5, 7), 3), "queries", r"\(5, 7\)"), ((q[None], g, 3), "queries", r"\(1, 4, 8\)"),
                               ((q, g[0], 3), "queries", r"\(8,\)"), ((q, g, 0), "k", "got 0")):
        with pytest.raises(ValueError, match=rf"^{first} ") as e:
            kernels.cosine_topk(*args)
        assert re.search(shape, str(e.value)), e.value
    with pytest.raises(ValueError, match=r"^backend .*'cuda'"):
        kernels.cosine_topk(q, g, 3, backend="cuda")
    x, w, b, t = (p.detach() for p in make_inputs(8, 16, 24, torch.float32))
    for args, shape in (((x, w, b, t[0]), r"temb \(24,\)"), ((x, w, b, t[:, :3]), r"temb \(8, 3\)"),
                        ((x[:, :5], w, b, t), r"x \(8, 5\)"), ((x[None], w, b, t), r"x \(1, 8, 16\)"),
                        ((x, w[0], b, t), r"weight \(16,\)"), ((x, w, b[:3], t), r"bias \(3,\)")):
        with pytest.raises(ValueError, match=r"^x ") as e:
            kernels.fused_linear_temb_silu(*args)
        assert re.search(shape, str(e.value)), e.value


@pytest.mark.parametrize("needs", ["x", "w", "b", "t", "x w"])
def test_fused_step_gives_exactly_the_gradients_asked_for(needs, launches):
    """Any subset of the inputs may need gradients (frozen weights, a fixed input): each one asked
    for equals torch's, the others stay None."""
    ins = [p.detach() for p in make_inputs(80, 24, 144, torch.float32)]
    ins = [a.requires_grad_(name in needs.split()) for a, name in zip(ins, "xwbt")]
    ref = [a.detach().clone().requires_grad_(a.requires_grad) for a in ins]
    fused(*ins).square().sum().backward()
    kernels.fused_linear_temb_silu_reference(*ref).square().sum().backward()
    for name, a, r in zip("xwbt", ins, ref):
        assert (a.grad is None) == (name not in needs.split()), name
        assert a.grad is None or torch.allclose(a.grad, r.grad, atol=1e-4, rtol=1e-4), name
    assert launches["fused_bwd"].launches == 1


def assert_topk_by_numpy(v, i, q, gal, k):
    """Checks a top-k against numpy alone (none of kernels/' code): float64 cosines with F.normalize's
    semantics (rows over max(|x|, 1e-12)), ranked by np.lexsort on (-score, index). Near-ties (float64
    scores within 1e-6) may come in either order, since fp32 rounding decides them; exact ties (identical
    gallery rows, or a zero query, against which every item scores 0) must keep the lower index first,
    and no better item may be left out."""
    qn, gn = (x.detach().double().cpu().numpy() for x in (q, gal))
    nq, ng = (np.maximum(np.linalg.norm(a, axis=1), 1e-12) for a in (qn, gn))
    s = (qn / nq[:, None]) @ (gn / ng[:, None]).T   # (M, N)
    index = np.arange(gn.shape[0])
    same_row = np.unique(gn, axis=0, return_inverse=True)[1].reshape(-1)   # equal ids: identical rows
    i, v = i.cpu().numpy(), v.detach().double().cpu().numpy()
    for r in range(len(s)):
        ref = np.lexsort((index, -s[r]))[:k]                 # the last key sorts first
        got = s[r, i[r]]
        assert np.allclose(v[r], s[r, ref], atol=1e-5), r                       # the k best values
        assert np.all((i[r] == ref) | (np.abs(got - s[r, ref]) < 1e-6)), r      # the same items, up to near-ties
        for j in i[r]:
            tied = index if not qn[r].any() else index[same_row == same_row[j]]   # exact ties of item j
            placed = [x for x in i[r] if x in set(tied)]
            assert placed == list(tied[:len(placed)]), (r, j, placed)            # the lowest indices, in order


def gallery_with_ties_and_zeros(M, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, gal = torch.randn(M, D, generator=g), torch.randn(N, D, generator=g)
    gal[N // 3] = gal[N // 5]            # duplicate rows: equal scores, lower index must win
    gal[N // 2] = 2.5 * gal[N // 5]      # same direction, another norm: the same cosine up to rounding
    gal[N - 1] = 0                        # zero vector: cosine 0, not NaN
    q[0] = 0
    return q.to(DEVICE), gal.to(DEVICE)


@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("shape", [(19, 300, 70), (40, 129, 33), (7, 50, 5)])   # D = 5: one padded D tile
def test_cosine_topk_kernel_matches_full_matrix(k, shape, launches):
    q, gal = gallery_with_ties_and_zeros(*shape)
    v, i = topk.cosine_topk_triton(q, gal, k)
    assert launches["cosine_topk"].launches == 1
    v_ref, i_ref = kernels.cosine_topk_reference(q, gal, k)   # its indices may differ on near-ties
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and (i == i_ref).float().mean() > 0.9
    assert torch.allclose(v, v_ref, atol=1e-5) and not torch.isnan(v).any()
    assert_topk_by_numpy(v, i, q, gal, k)
    cos = F.cosine_similarity(q[:, None, :], gal[i], dim=-1)   # the values are the returned items' cosines
    assert torch.allclose(v[1:], cos[1:], atol=1e-5)
    assert (v[0] == 0).all()                                   # the zero query


def test_cosine_topk_largest_k_and_several_slices(launches):
    q, gal = gallery_with_ties_and_zeros(9, 700, 20, seed=3)
    k = kernels.K_MAX                                       # the largest k the kernel takes (KP == K)
    v, i = topk.cosine_topk_triton(q, gal, k, slice_len=128)   # 6 slices, each keeping k > 9 rows' worth
    assert launches["cosine_topk"].launches == 1
    assert torch.allclose(v, kernels.cosine_topk_reference(q, gal, k)[0], atol=1e-5)
    assert_topk_by_numpy(v, i, q, gal, k)


def test_cosine_topk_kernel_merges_across_the_tiles_of_one_slice(launches):
    """Slices of 4 tiles (a GPU slice holds many): a later tile's better items must displace the
    kept ones, item 0 included (the lowest index is kept first in its tile and later displaced)."""
    q, gal = gallery_with_ties_and_zeros(40, 700, 24, seed=4)
    gal[0] = -q[1:].sum(0) / 40 + 0.01 * gal[0]       # item 0: low but positive-ish for most queries
    for k in (2, 10):
        v, i = topk.cosine_topk_triton(q, gal, k, slice_len=4 * topk.topk_config(40, 24, k, q.dtype)["BLOCK_N"])
        assert_topk_by_numpy(v, i, q, gal, k)
    assert launches["cosine_topk"].launches == 2


@pytest.mark.parametrize("scale", [1e-3, 1e3, 1e-14])
def test_cosine_topk_has_f_normalize_semantics_at_every_norm(scale, launches):
    """Rows far from unit norm, down to below F.normalize's eps (1e-12, where x / max(|x|, eps) is no
    longer a unit vector): the kernel and the torch path both score as F.normalize does."""
    q, gal = gallery_with_ties_and_zeros(19, 300, 24, seed=7)
    q, gal = q * scale, gal * scale * torch.linspace(0.5, 2, 300, device=DEVICE)[:, None]
    for v, i in (topk.cosine_topk_triton(q, gal, 10), kernels.cosine_topk_torch(q, gal, 10)):
        assert_topk_by_numpy(v, i, q, gal, 10)
    assert launches["cosine_topk"].launches == 1


def test_cosine_topk_kernel_never_returns_a_column_past_the_gallery(launches):
    """Every cosine negative: a padded column past the gallery (score 0 if it were not masked)
    would rank first. N = 70 fills part of one tile; k = 32 asks for nearly every item."""
    g = torch.Generator().manual_seed(6)
    q = torch.rand(5, 16, generator=g).to(DEVICE) + 0.1        # positive entries ...
    gal = -torch.rand(70, 16, generator=g).to(DEVICE) - 0.1    # ... against negative ones
    for k in (10, 32):
        v, i = topk.cosine_topk_triton(q, gal, k)
        assert (i < 70).all() and (v < 0).all()
        assert_topk_by_numpy(v, i, q, gal, k)
    assert launches["cosine_topk"].launches == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cosine_topk_kernel_every_dtype_exact_ties(dtype, launches):
    """Entries in {-1, 0, 1} (exact in every dtype), gallery rows of equal norm: scores are exact
    integer dots times one constant, so every index must match, ties to the lower index."""
    q, gal = topk.check_input(M=70, N=300, D=160, seed=5)    # 70 > 64 query rows, 300 > 256 gallery rows
    v, i = topk.cosine_topk_triton(q.to(DEVICE, dtype), gal.to(DEVICE, dtype), 10)
    assert launches["cosine_topk"].launches == 1
    s = (q.double() @ gal.double().T) / q.double().norm(dim=1).clamp_min(1e-12)[:, None] / 4   # norm 4
    order = torch.sort(s, dim=1, descending=True, stable=True)   # stable: equal scores keep index order
    assert torch.equal(i.cpu(), order.indices[:, :10])
    assert torch.allclose(v.cpu().double(), order.values[:, :10], atol=1e-6)
    assert (order.values[:, 9] == order.values[:, 10]).sum() > 10   # ties really cross the k-th place


@pytest.mark.parametrize("k", [1, 5, 10, 64])
def test_chunked_torch_path_matches_full_matrix(k):
    q, gal = gallery_with_ties_and_zeros(31, 1005, 24, seed=1)
    v, i = kernels.cosine_topk_torch(q, gal, k, budget_bytes=4 * 31 * 100)   # 10 chunks of 100, then 5 (< k)
    v_ref, i_ref = kernels.cosine_topk_reference(q, gal, k)
    assert torch.allclose(v, v_ref, atol=1e-6)
    assert_topk_by_numpy(v, i, q, gal, k)
    assert_topk_by_numpy(v_ref, i_ref, q, gal, k)   # the reference itself


def test_chunked_scores_are_the_metrics_expression_bit_for_bit():
    """The retrieval metrics computed F.normalize(q.float()) @ F.normalize(chunk.float()).T; on one chunk
    (a gallery of 4,096 rows, 1,000 queries) the torch path's values are exactly those scores, in fp32 and
    from fp16 inputs, and its order is their stable sort."""
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float16):
        q, gal = (torch.randn(n, 512, generator=g).to(DEVICE, dtype) for n in (1000, 4096))
        gal[100] = gal[7]                                                      # an exact tie
        s = F.normalize(q.float(), dim=-1) @ F.normalize(gal.float(), dim=-1).T
        v, i = kernels.cosine_topk_torch(q, gal, 10)
        order = s.sort(dim=1, descending=True, stable=True)
        assert torch.equal(v, s.gather(1, i)) and torch.equal(i, order.indices[:, :10])


def test_chunked_torch_path_memory_is_bounded_by_the_chunk(monkeypatch):
    """Peak extra memory follows the chunk budget, not M x N: every score block made is one chunk's."""
    shapes, real = [], kernels._chunk_topk
    monkeypatch.setattr(kernels, "_chunk_topk", lambda s, k: shapes.append(tuple(s.shape)) or real(s, k))
    q, gal = torch.randn(50, 16), torch.randn(20000, 16)
    v, i = kernels.cosine_topk_torch(q, gal, 10, budget_bytes=4 * 50 * 1024)      # chunks of 1,024 rows
    assert shapes == [(50, 1024)] * 19 + [(50, 20000 - 19 * 1024)]
    assert torch.equal(i, kernels.cosine_topk_reference(q, gal, 10)[1])
    shapes.clear()   # 5,000 rows' worth: rounded down to a multiple of 512 (the GEMM's fast sizes)
    kernels.cosine_topk_torch(q, gal, 10, budget_bytes=4 * 50 * 5000)
    assert shapes == [(50, 4608)] * 4 + [(50, 20000 - 4 * 4608)]
    shapes.clear()   # the default 16 MiB: capped at 8,192 rows
    kernels.cosine_topk_torch(q, gal, 10)
    assert shapes == [(50, 8192)] * 2 + [(50, 20000 - 2 * 8192)]


def test_streaming_retrieval_metrics_equal_the_dense_ones():
    q, gal = gallery_with_ties_and_zeros(60, 250, 16, seed=2)   # on CUDA, "auto" takes the kernel
    gal[125] = gal[50]  # exact duplicates only: a rescaled copy ties only up to rounding, which
    q[0] = gal[7]       # the dense and streamed paths need not round alike
    single = torch.randint(0, 250, (60,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    multi = torch.zeros(60, 250, dtype=torch.bool, device=DEVICE)
    multi[torch.arange(60, device=DEVICE), single] = True
    multi[torch.arange(60, device=DEVICE), (single * 7) % 250] = True
    for rel in (single, multi):
        dense = ev.retrieval_metrics(ev.cosine_scores(q, gal), rel)
        streamed = ev.retrieval_metrics_from_embeddings(q, gal, rel, chunk=37)
        assert dense.keys() == streamed.keys()
        for key in dense:
            assert streamed[key] == pytest.approx(dense[key], abs=1e-6), key


def test_end_to_end_triton_matches_torch(launches):
    """One training step and a 5-step sample agree between kernels 'triton' (the interpreter on a CPU) and 'torch'."""
    results = {}
    for mode in ("torch", "triton"):
        dg.KERNELS = mode
        try:
            torch.manual_seed(0)
            model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=24, dim_b=24, hidden=32, inner=16, depth=2, time_dim=16))
            with torch.no_grad():
                for blk in model.net.blocks:   # non-zero second layers, so the blocks matter
                    blk.fc2.weight.normal_(0, 0.2)
            model.to(DEVICE)
            a, b = torch.randn(16, 24).to(DEVICE), torch.randn(16, 24).to(DEVICE)
            opt = dg.make_optimizer(model, 1e-2)
            loss = next(dg.train_steps(model, a, b, opt, 1, 16, seed=0))["loss"].item()
            out = model.sample(b[:6], 0, steps=5, use_ema=False,
                               generator=torch.Generator(device=DEVICE).manual_seed(0))
            results[mode] = (loss, out, [p.detach().clone() for p in model.net.parameters()])
            # the triton run launched the kernel in both blocks for the step and each of the 5 sampling
            # steps (the first-use check, if it runs here, adds launches of its own)
            fwd = launches["fused_fwd"].launches
            assert (fwd == 0) if mode == "torch" else fwd >= 2 * (1 + 5)
        finally:
            dg.KERNELS = "auto"
    (l0, o0, p0), (l1, o1, p1) = results["torch"], results["triton"]
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert torch.allclose(o0, o1, atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(p0, p1))


# Each way of switching TF32 on or off, and what the kernels must then use for fp32 dots.
# Mixing torch's new and legacy TF32 APIs is sticky (the legacy getters raise for the rest of the
# process), so every case runs in a fresh fork of a process whose flags were never touched.
TF32_CASES = {
    "untouched": ("", "ieee"),
    "new API, global tf32": ("torch.backends.fp32_precision = 'tf32'", "tf32"),
    "new API, global ieee": ("torch.backends.fp32_precision = 'ieee'", "ieee"),
    "new API, matmul only tf32": ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    "new API, matmul only ieee": ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    "new API, global tf32 but matmul ieee": ("torch.backends.fp32_precision = 'tf32'; "
                                             "torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    "new API, CPU (mkldnn) matmul tf32 only": ("torch.backends.mkldnn.matmul.fp32_precision = 'tf32'", "ieee"),
    "legacy allow_tf32 True": ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
    "legacy allow_tf32 False": ("torch.backends.cuda.matmul.allow_tf32 = False", "ieee"),
    "set_float32_matmul_precision high": ("torch.set_float32_matmul_precision('high')", "tf32"),
    "set_float32_matmul_precision medium": ("torch.set_float32_matmul_precision('medium')", "tf32"),
    "set_float32_matmul_precision highest": ("torch.set_float32_matmul_precision('highest')", "ieee"),
    "legacy True, then new API matmul ieee": ("torch.backends.cuda.matmul.allow_tf32 = True; "
                                              "torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    "new API tf32, then legacy False": ("torch.backends.cuda.matmul.fp32_precision = 'tf32'; "
                                        "torch.backends.cuda.matmul.allow_tf32 = False", "ieee"),
}

TF32_PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    import kernels
    cases, launch = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {}
    for name, (setting, _) in cases.items():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # a fresh copy of a process that never touched the flags
            os.close(r)
            try:
                exec(setting)
                got = dict(precision=kernels.fp32_dot_precision(),
                           fused=kernels.fused_mlp.fused_config(80, 144, 160, torch.float32)[0]["PRECISION"],
                           topk=kernels.topk.topk_config(48, 160, 10, torch.float32)["PRECISION"])
                if kernels.INTERPRET and name in launch:   # the reported failure: any kernel launch raised
                    x, w_, b, t = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8), torch.randn(8, 8)
                    y = kernels.fused_linear_temb_silu(x, w_, b, t, strict=True)
                    got["launch"] = bool(torch.allclose(y, kernels.fused_linear_temb_silu_reference(x, w_, b, t), atol=1e-5))
                    v, i = kernels.cosine_topk(x, w_, 3, backend="triton", strict=True)
                    got["launch"] &= bool(torch.equal(i, kernels.cosine_topk_reference(x, w_, 3)[1]))
            except Exception as e:
                got = dict(error=f"{type(e).__name__}: {e}")
            os.write(w, json.dumps(got).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out[name] = json.loads(f.read())
        os.waitpid(pid, 0)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not hasattr(sys.modules["os"], "fork"), reason="needs os.fork")
def test_fp32_dots_follow_every_way_of_setting_tf32():
    """New API (global, matmul only), legacy allow_tf32, set_float32_matmul_precision, and mixes:
    the kernels read torch's effective cuBLAS setting without raising, and still launch."""
    launch = ["new API, global tf32", "new API, matmul only tf32", "set_float32_matmul_precision high"]
    # torch < 2.9 has no fp32_precision: only the legacy ways can be tried there
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    cases = {name: case for name, case in TF32_CASES.items() if new_api or "fp32_precision" not in case[0]}
    res = subprocess.run([sys.executable, "-c", TF32_PROBE, json.dumps(cases), json.dumps(launch)],
                         capture_output=True, text=True,
                         cwd=dg.__file__.rsplit("/", 1)[0], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got) == set(cases)
    for name, (_, want) in cases.items():
        assert "error" not in got[name], (name, got[name])
        assert got[name]["precision"] == got[name]["fused"] == got[name]["topk"] == want, (name, got[name])
        assert got[name].get("launch") is (True if name in launch and kernels.INTERPRET else None), name


def test_fp32_dots_on_a_torch_without_the_new_api(monkeypatch):
    """torch < 2.9 has no fp32_precision attribute: the legacy allow_tf32 flag decides."""
    class LegacyMatmul:   # what torch.backends.cuda.matmul offers before 2.9
        allow_tf32 = False

        def __getattr__(self, name):
            raise AttributeError(f"Unknown attribute {name}")

    legacy = LegacyMatmul()
    monkeypatch.setattr(torch.backends.cuda, "matmul", legacy)
    assert kernels.fp32_dot_precision() == "ieee"
    legacy.allow_tf32 = True
    assert kernels.fp32_dot_precision() == "tf32"
