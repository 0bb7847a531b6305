"""Fused linear + bias + time embedding + SiLU: the denoiser's hidden step in one launch.

    y = silu(x @ W^T + b + temb)        x (B, K), W (N, K) as nn.Linear stores it, b (N,),
                                        temb (B, N) per row or (N,) broadcast -> y (B, N)

Unfused, torch runs a matmul (addmm with the bias), an add for temb and a SiLU: three
launches, and the (B, N) intermediate is written and read back twice. Here the matmul
accumulates in fp32 and the epilogue adds b and temb and applies SiLU before the one store.
When gradients are needed the kernel also stores the pre-activation z, which the backward
needs for silu'(z).

Backward: one kernel computes dz = dy * silu'(z) and, per block of rows, the column sums of
dz (written to a (row_blocks, N) buffer and summed by torch afterwards: deterministic, no
float atomics); those sums are db, and dtemb when temb was broadcast. dW = dz^T x and
dx = dz W are left to torch's matmuls, which are already as fast as it gets.

fused_linear_temb_silu runs the first-use check (kernels/first_use.py, self_test below) the
first time it meets a dtype and device in a process, and takes the torch path (reference) for
the rest of the process if the kernel fails it or a launch raises.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, first_use, fp32_dot_precision

NAME = "fused_linear_temb_silu"


@triton.jit
def _fused_fwd_kernel(x_ptr, w_ptr, b_ptr, t_ptr, y_ptr, z_ptr, M, N, K,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tn, stride_ym, stride_yn,
                      TEMB_ROWS: tl.constexpr, STORE_Z: tl.constexpr, CAST_TILES: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        # W^T tile (BLOCK_K, BLOCK_N), read straight from nn.Linear's (N, K) layout
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        if CAST_TILES:  # the interpreter's bf16 dot is wrong; fp32 tiles are exact there
            x, w = x.to(ACC), w.to(ACC)
        acc += tl.dot(x, w, input_precision=PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    z = acc + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    if TEMB_ROWS:
        z += tl.load(t_ptr + rm[:, None] * stride_tm + rn[None, :] * stride_tn, mask=mask, other=0.0).to(ACC)
    else:
        z += tl.load(t_ptr + rn * stride_tn, mask=rn < N, other=0.0).to(ACC)[None, :]
    y = z * tl.sigmoid(z)
    offs = rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_bwd_kernel(dy_ptr, z_ptr, dz_ptr, part_ptr, M, N, stride_m, stride_n,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * stride_m + rn[None, :] * stride_n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    s = tl.sigmoid(z)
    dz = dy * s * (1 + z * (1 - s))            # d/dz [z sigmoid(z)]
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid_m * N + rn, tl.sum(dz, axis=0), mask=rn < N)  # this row block's column sums


def _acc(dtype: torch.dtype):
    """Accumulate in fp32, or in fp64 for fp64 inputs (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def fused_config(M: int, N: int, K: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """The forward kernel's constexprs and num_warps for x (M, K), W (N, K) of dtype.

    Big tiles under the interpreter (its cost is per program and loop step). The launcher and
    the compile tests / resource report (kernels/aot.py) share this function.
    """
    bm, bn, bk = (64, 128, 128) if interpret else (64, 64, 32)
    return dict(CAST_TILES=interpret or dtype == torch.float32, ACC=_acc(dtype), PRECISION=fp32_dot_precision(),
                BLOCK_M=min(bm, triton.next_power_of_2(M)), BLOCK_N=min(bn, triton.next_power_of_2(N)),
                BLOCK_K=max(16, min(bk, triton.next_power_of_2(K))), num_warps=4)


def backward_config(M: int, N: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """The backward kernel's constexprs: the forward's row and column tiles (K plays no part)."""
    fwd = fused_config(M, N, 1, dtype, interpret)
    return dict(ACC=fwd["ACC"], BLOCK_M=fwd["BLOCK_M"], BLOCK_N=fwd["BLOCK_N"], num_warps=4)


def fused_forward(x, weight, bias, temb, store_z: bool):
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = torch.empty_like(y) if store_z else y  # z_ptr is never written when store_z is False
    rows = temb.dim() == 2
    cfg = fused_config(M, N, K, x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _fused_fwd_kernel[grid](x, weight, bias, temb, y, z, M, N, K,
                            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                            temb.stride(0) if rows else 0, temb.stride(-1), y.stride(0), y.stride(1),
                            TEMB_ROWS=rows, STORE_Z=store_z, **cfg)
    return y, (z if store_z else None)


def fused_backward_dz(dy, z):
    """dz = dy * silu'(z) (M, N) and its column sums (N,) in fp32 (fp64 for fp64 inputs)."""
    M, N = z.shape
    dy = dy.contiguous()
    dz = torch.empty_like(z)
    cfg = backward_config(M, N, z.dtype)
    row_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    part = torch.empty(row_blocks, N, device=z.device, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)
    _fused_bwd_kernel[(row_blocks, triton.cdiv(N, cfg["BLOCK_N"]))](dy, z, dz, part, M, N, z.stride(0), z.stride(1),
                                                                    **cfg)
    return dz, part.sum(0)


def _dz_torch(dy, z):
    """fused_backward_dz in torch: the fallback when the backward kernel fails to launch."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    zf = z.to(acc)
    s = torch.sigmoid(zf)
    dz = dy.to(acc) * s * (1 + zf * (1 - s))
    return dz.to(z.dtype), dz.sum(0)


class FusedLinearTembSiLU(torch.autograd.Function):
    """The kernels as an autograd op. strict: what a failing backward launch does: False warns
    once and computes dz in torch, True raises KernelCheckError, None re-raises the error (the
    first-use check, which records it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, temb, strict=False):
        needs_grad = any(ctx.needs_input_grad)
        y, z = fused_forward(x, weight, bias, temb, store_z=needs_grad)
        if needs_grad:
            ctx.save_for_backward(x, weight, z)
            ctx.temb_rows = temb.dim() == 2
            ctx.strict = strict
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z = ctx.saved_tensors
        try:
            dz, col_sum = fused_backward_dz(dy, z)
        except Exception as e:  # noqa: BLE001 - a launch error: warn once (or raise if strict), then torch
            if ctx.strict is None:   # the first-use check itself: the error is its finding
                raise
            first_use.failed(NAME, z, e, ctx.strict)
            dz, col_sum = _dz_torch(dy, z)
        dx = dz @ weight if ctx.needs_input_grad[0] else None                 # (M, K)
        dw = dz.t() @ x if ctx.needs_input_grad[1] else None                  # (N, K)
        db = col_sum.to(weight.dtype) if ctx.needs_input_grad[2] else None
        dt = None
        if ctx.needs_input_grad[3]:
            dt = dz if ctx.temb_rows else col_sum.to(weight.dtype)
        return dx, dw, db, dt, None


def fused_linear_temb_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temb: torch.Tensor,
                           strict: bool = False) -> torch.Tensor:
    """silu(x @ weight^T + bias + temb) in one Triton kernel; x (B, K), weight (N, K), bias (N,),
    temb (B, N) or (N,) -> (B, N) in x's dtype; differentiable in all four.

    The first call for a (dtype, device) in a process runs the first-use check (module
    docstring); if the kernel fails it, or a launch raises, this returns reference(...) (the
    torch path) for the rest of the process after one KernelFallbackWarning, or raises
    kernels.KernelCheckError when strict (diffgap passes strict=True for KERNELS = "triton").
    ValueError: shapes that do not fit.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fused step: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    if temb.shape not in ((weight.shape[0],), (x.shape[0], weight.shape[0])):
        raise ValueError(f"fused step: temb {tuple(temb.shape)} must be ({weight.shape[0]},) or {(x.shape[0], weight.shape[0])}")
    if not first_use.usable(NAME, x, strict, self_test):
        return reference(x, weight, bias, temb)
    try:
        return FusedLinearTembSiLU.apply(x, weight, bias, temb, strict)
    except Exception as e:  # noqa: BLE001 - a compile or launch error at these shapes: warn once (or raise)
        first_use.failed(NAME, x, e, strict)
        return reference(x, weight, bias, temb)


def reference(x, weight, bias, temb):
    """The plain torch expression every kernel result is compared against (and the fallback)."""
    return torch.nn.functional.silu(torch.nn.functional.linear(x, weight, bias) + temb)


# The check's input: several row, column and K tiles at both the GPU and the interpreter configs
# (GPU 64x64x32, interpreter 64x128x128), and multiples of 16 like the default hidden step
# (64 x 512 -> 224), so that Triton specialises the launch as it does for the real call and the
# check compiles nothing the real call would not.
CHECK_SHAPE = (80, 160, 144)   # M, K, N


def self_test(dtype: torch.dtype, device: torch.device) -> dict:
    """The first-use check of the fused step: kernel against reference() in float64 on a fixed input.

    Per-row temb with gradients (y, dx, dW, db, dtemb through both kernels), broadcast temb with
    gradients (y, dtemb: the column-sum path) and per-row temb without gradients (the sampling
    launch, which stores no z). Returns {tensor: (max abs error, tolerance)}; raises what a
    launch raises. Uses its own generator: no RNG state changes.
    """
    M, K, N = CHECK_SHAPE
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    t_rows, t_one = torch.randn(M, N, generator=g), torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g)
    tol = first_use.tolerance(dtype)
    cast = lambda a: a.to(device=device, dtype=dtype)
    errors = {}
    for label, temb in (("", t_rows), ("broadcast temb: ", t_one)):
        ins = [cast(a).requires_grad_() for a in (x, w, b, temb)]
        y = FusedLinearTembSiLU.apply(*ins, None)
        y.backward(cast(dy))
        ref = [a.detach().double().requires_grad_() for a in ins]
        y_ref = reference(*ref)
        y_ref.backward(cast(dy).double())
        errors[label + "y"] = first_use.max_error(y, y_ref, tol)
        names = ("dx", "dW", "db", "dtemb") if not label else ("dtemb",)
        for name in names:
            i = ("dx", "dW", "db", "dtemb").index(name)
            errors[label + name] = first_use.max_error(ins[i].grad, ref[i].grad, tol)
    with torch.no_grad():
        ins = [cast(a) for a in (x, w, b, t_rows)]
        errors["y without grad"] = first_use.max_error(FusedLinearTembSiLU.apply(*ins, None),
                                                       reference(*(a.double() for a in ins)), tol)
    return errors
