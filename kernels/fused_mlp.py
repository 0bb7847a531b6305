"""The denoiser's hidden step silu(x @ W^T + b + temb) in one Triton launch, and its backward. Unfused,
torch writes the (B, N) intermediate and reads it back twice (addmm, + temb, SiLU); here the matmul's
epilogue adds b and temb and applies SiLU before the one store. The backward kernel computes
dz = dy silu'(z) and per row block the column sums of dz, which torch adds into db (deterministic: no
float atomics); dx = dz W and dW = dz^T x are cuBLAS's."""
import torch
import triton
import triton.language as tl

from . import INTERPRET, TOL, fail, fp32_dot_precision, fused_linear_temb_silu_reference, max_error, unit_stride


@triton.jit
def _fused_fwd_kernel(
    x_ptr,  # (M, K) input, rows stride_x apart; y and z are contiguous
    w_ptr,  # (N, K) weight as nn.Linear stores it, rows stride_w apart, read as W^T tiles: no transposed copy
    b_ptr,  # (N,) bias, contiguous
    t_ptr,  # (M, N) time embedding, one row per sample, rows stride_t apart
    y_ptr,  # (M, N) out: silu(z)
    z_ptr,  # (M, N) out: z, which the backward needs for silu'(z); never written unless STORE_Z
    M,  # rows: the batch
    N,  # output features
    K,  # input features: the reduction
    stride_x,  # elements between rows of x
    stride_w,  # elements between rows of the weight
    stride_t,  # elements between rows of temb
    STORE_Z: tl.constexpr,  # a backward will follow; sampling stores y alone
    CAST_TILES: tl.constexpr,  # dot in ACC: the interpreter's fp16 and bf16 dots are wrong
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs (gradcheck)
    PRECISION: tl.constexpr,  # input_precision of fp32 dots: torch's TF32 setting, not Triton's default
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction step
):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)   # offsets in int64: M N passes 2^31
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_w + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        if CAST_TILES:
            x, w = x.to(ACC), w.to(ACC)
        acc += tl.dot(x, w, input_precision=PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    z = acc + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    offs = rm[:, None] * N + rn[None, :]
    z += tl.load(t_ptr + rm[:, None] * stride_t + rn[None, :], mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + offs, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_bwd_kernel(
    dy_ptr,  # (M, N) upstream gradient; every tensor here is contiguous
    z_ptr,  # (M, N) the forward's pre-activation
    dz_ptr,  # (M, N) out: dy silu'(z), which is dtemb and feeds dx and dW
    part_ptr,  # (row blocks, N) out, in ACC: this row block's column sums of dz, for db
    M,  # rows
    N,  # columns
    ACC: tl.constexpr,  # arithmetic dtype: fp32, or fp64 for fp64 inputs
    BLOCK_M: tl.constexpr,  # rows per program: one row of part each
    BLOCK_N: tl.constexpr,  # columns per program
):
    base = tl.program_id(0).to(tl.int64) * BLOCK_M * N   # the block's first element in int64: M N passes 2^31
    dy_ptr, z_ptr, dz_ptr = dy_ptr + base, z_ptr + base, dz_ptr + base
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = tl.arange(0, BLOCK_M)[:, None] * N + rn[None, :]   # within the block
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    s = tl.sigmoid(z)
    dz = dy * s * (1 + z * (1 - s))   # d/dz z sigmoid(z)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + tl.program_id(0) * N + rn, tl.sum(dz, axis=0), mask=rn < N)


def fused_config(M: int, N: int, K: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> tuple[dict, dict]:
    """The forward's and the backward's constexprs and num_warps, shared with benchmarks/aot.py so that what
    it compiles is what runs. tl.dot needs tiles of 16 or more; the interpreter's cost is per step."""
    tile = lambda n, most: max(16, min(most, triton.next_power_of_2(n)))
    bm, bn, bk = (64, 128, 128) if interpret else (64, 64, 32)
    bwd = dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK_M=tile(M, bm), BLOCK_N=tile(N, bn),
               num_warps=4)
    return dict(bwd, CAST_TILES=interpret, PRECISION=fp32_dot_precision(), BLOCK_K=tile(K, bk)), bwd


class FusedLinearTembSiLU(torch.autograd.Function):
    """The kernels as one differentiable op. strict: a failing backward launch warns once and computes dz in
    torch (False), raises KernelCheckError (True) or re-raises (None: the check's own launches). store_z=False:
    no gradient will be asked for, which needs_input_grad cannot tell (it ignores no_grad)."""

    @staticmethod
    def forward(ctx, x, weight, bias, temb, strict=False, store_z=True):
        (x, weight, temb), bias = (unit_stride(a) for a in (x, weight, temb)), bias.contiguous()
        (M, K), N = x.shape, weight.shape[0]
        store_z = store_z and any(ctx.needs_input_grad[:4])
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        z = torch.empty_like(y) if store_z else y
        cfg = fused_config(M, N, K, x.dtype)[0]
        _fused_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))](
            x, weight, bias, temb, y, z, M, N, K, x.stride(0), weight.stride(0), temb.stride(0), STORE_Z=store_z, **cfg)
        ctx.strict = strict
        if store_z:
            ctx.save_for_backward(x, weight, z)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z = ctx.saved_tensors
        (M, N), acc = z.shape, torch.float64 if z.dtype == torch.float64 else torch.float32
        cfg = fused_config(M, N, 16, z.dtype)[1]
        dz, part = torch.empty_like(z), torch.empty(triton.cdiv(M, cfg["BLOCK_M"]), N, device=z.device, dtype=acc)
        try:
            _fused_bwd_kernel[(len(part), triton.cdiv(N, cfg["BLOCK_N"]))](dy.contiguous(), z, dz, part, M, N, **cfg)
            db = part.sum(0)
        except Exception as e:  # noqa: BLE001 - warn once (or raise when strict), then the same arithmetic in torch
            if ctx.strict is None:
                raise
            fail("fused_linear_temb_silu", z, ctx.strict, e)
            za = z.to(acc)
            dz = dy.to(acc) * torch.sigmoid(za) * (1 + za * (1 - torch.sigmoid(za)))
            dz, db = dz.to(z.dtype), dz.sum(0)
        need = ctx.needs_input_grad
        return (dz @ weight if need[0] else None, dz.t() @ x if need[1] else None,
                db.to(z.dtype) if need[2] else None, dz if need[3] else None, None, None)


def self_test(dtype: torch.dtype, device) -> dict:
    """The first-use check: {tensor: (max error, tolerance)} of both kernels against the reference in float64
    (y, dx, dW, db, dtemb, and y without grad: the sampling launch). Several row, column and K tiles at every
    config, in multiples of 16 like the default step: the check compiles what the real call runs."""
    g = torch.Generator().manual_seed(1234)   # its own: no RNG state changes
    shapes, scales = ((80, 160), (144, 160), (144,), (80, 144), (80, 144)), (1, 160 ** 0.5, 1, 1, 1)
    x, w, b, t, dy = (torch.randn(shape, generator=g).div(c).to(device, dtype) for shape, c in zip(shapes, scales))
    ins, ref = [a.clone().requires_grad_() for a in (x, w, b, t)], [a.double().requires_grad_() for a in (x, w, b, t)]
    y, y_ref = FusedLinearTembSiLU.apply(*ins, None), fused_linear_temb_silu_reference(*ref)
    y.backward(dy)
    y_ref.backward(dy.double())
    with torch.no_grad():
        y_nograd = FusedLinearTembSiLU.apply(*ins, None, False)
    got, want = [y] + [a.grad for a in ins] + [y_nograd], [y_ref] + [a.grad for a in ref] + [y_ref]
    tol = TOL[torch.float16 if dtype == torch.float32 and fp32_dot_precision() == "tf32" else dtype]  # TF32: fp16's
    names = ("y", "dx", "dW", "db", "dtemb", "y without grad")
    return {name: max_error(a, b, tol) for name, a, b in zip(names, got, want)}
