"""Exact top-k cosines in one Triton launch, without the (M, N) scores. Each program owns BLOCK_M queries
and a slice of the gallery, and merges each gallery tile's scores into a running top-k held in registers:
k times, each row's best remaining score (the lowest index among equals) replaces the row's worst kept
entry (the highest index among equals) where it beats it. Torch merges the slices' candidates."""
import torch
import triton
import triton.language as tl

from . import INTERPRET, _merge, fp32_dot_precision, max_error, unit_stride


@triton.jit
def _cosine_topk_kernel(
    q_ptr,  # (M, D) queries of any norm, rows stride_q apart; every other tensor is contiguous
    g_ptr,  # (N, D) gallery, rows stride_g apart, read as transposed tiles
    qinv_ptr,  # (M,) fp32 1 / max(|q|, 1e-12): F.normalize's scaling, so a zero row scores 0, not NaN
    ginv_ptr,  # (N,) fp32 the same for the gallery
    out_v_ptr,  # (M, slices, K) fp32 out: each slice's k best cosines per query
    out_i_ptr,  # (M, slices, K) int32 out: their gallery rows
    M,  # queries
    N,  # gallery rows
    D,  # embedding dimension: the reduction
    stride_q,  # elements between query rows (a view's rows may be far apart)
    stride_g,  # elements between gallery rows
    slice_len,  # gallery rows per program along axis 1, a multiple of BLOCK_N
    K: tl.constexpr,  # k: selection passes per tile
    KP: tl.constexpr,  # k rounded up to a power of two, as tl.arange needs
    CAST_FP32: tl.constexpr,  # dot fp32 tiles: fp32 and fp64 inputs, and the interpreter (wrong half dots)
    PRECISION: tl.constexpr,  # input_precision of fp32 dots: torch's TF32 setting, not Triton's default
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # gallery rows per tile
    BLOCK_D: tl.constexpr,  # reduction step
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_rows = q_ptr + rm[:, None].to(tl.int64) * stride_q   # int64: row * stride passes 2^31 at 4.2M x 512
    first = tl.program_id(0).to(tl.int64) * BLOCK_M * tl.num_programs(1) * K   # the outputs' block, in int64
    out_v_ptr, out_i_ptr = out_v_ptr + first, out_i_ptr + first
    slot = tl.arange(0, KP)
    # empty slots hold -inf and distinct indices past the gallery; padding slots +inf, never replaced
    best_v = tl.where(slot[None, :] < K, tl.full((BLOCK_M, KP), float("-inf"), tl.float32), float("inf"))
    best_i = tl.zeros((BLOCK_M, KP), tl.int32) + N + slot[None, :]
    qinv = tl.load(qinv_ptr + rm, mask=rm < M, other=0.0)
    start = tl.program_id(1) * slice_len
    for n0 in range(start, start + slice_len, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g_rows = rn[None, :].to(tl.int64) * stride_g
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_rows + rd[None, :], mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)
            g = tl.load(g_ptr + g_rows + rd[:, None], mask=(rn[None, :] < N) & (rd[:, None] < D), other=0.0)
            if CAST_FP32:
                q, g = q.to(tl.float32), g.to(tl.float32)
            acc += tl.dot(q, g, input_precision=PRECISION)
        s = acc * qinv[:, None] * tl.load(ginv_ptr + rn, mask=rn < N, other=0.0)[None, :]
        s = tl.where(rn[None, :] < N, s, float("-inf"))   # a padded column would score 0 and could rank
        for _ in range(K):
            top_v = tl.max(s, axis=1)
            top_i = tl.min(tl.where(s == top_v[:, None], rn[None, :], 2147483647), axis=1)
            worst_v = tl.min(best_v, axis=1)
            worst_i = tl.max(tl.where(best_v == worst_v[:, None], best_i, -1), axis=1)
            better = (top_v > worst_v) | ((top_v == worst_v) & (top_i < worst_i))
            replace = (best_v == worst_v[:, None]) & (best_i == worst_i[:, None]) & better[:, None]
            best_v = tl.where(replace, top_v[:, None], best_v)
            best_i = tl.where(replace, top_i[:, None], best_i)
            s = tl.where(rn[None, :] == top_i[:, None], float("-inf"), s)
    offs = (tl.arange(0, BLOCK_M)[:, None] * tl.num_programs(1) + tl.program_id(1)) * K + slot[None, :]
    keep = (rm[:, None] < M) & (slot[None, :] < K)
    tl.store(out_v_ptr + offs, best_v, mask=keep)
    tl.store(out_i_ptr + offs, best_i, mask=keep)


def topk_config(M: int, D: int, k: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """The kernel's constexprs and num_warps, shared with benchmarks/aot.py. The (BLOCK_M, KP) running top-k
    lives beside the (BLOCK_M, BLOCK_N) scores: 64 rows with 4 warps would spill past the 255-register cap,
    so fp32 (IEEE dots on CUDA cores) takes 16 rows and fp16/bf16 (tensor cores) 32 rows with 8 warps."""
    half = dtype in (torch.float16, torch.bfloat16)
    bm, bn, bd, warps = (64, 128, 128, 4) if interpret else (32, 64, 64, 8) if half else (16, 64, 64, 4)
    tile = lambda n, most: min(most, max(16, triton.next_power_of_2(n)))   # tl.dot needs 16 or more
    return dict(K=k, KP=triton.next_power_of_2(k), CAST_FP32=interpret or not half, PRECISION=fp32_dot_precision(),
                BLOCK_M=tile(M, bm), BLOCK_N=bn, BLOCK_D=tile(D, bd), num_warps=warps)


def cosine_topk_triton(queries: torch.Tensor, gallery: torch.Tensor, k: int, slice_len: int | None = None):
    """The kernel's top-k as cosine_topk returns it, for k <= K_MAX (a larger k would spill)."""
    q, g, k = unit_stride(queries), unit_stride(gallery), min(k, len(gallery))
    (M, D), N = q.shape, len(g)
    if M == 0 or k == 0:   # nothing to launch
        return q.new_empty(M, k, dtype=torch.float32), torch.empty(M, k, dtype=torch.long, device=q.device)
    cfg = topk_config(M, D, k, q.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if slice_len is None:   # enough slices for ~512 programs, to fill the GPU
        slice_len = bn * triton.cdiv(triton.cdiv(N, bn), max(1, 512 // triton.cdiv(M, bm)))
    slice_len = triton.cdiv(slice_len, bn) * bn
    n_slices = triton.cdiv(N, slice_len)
    out_v, out_i = (torch.empty(M, n_slices, k, device=q.device, dtype=d) for d in (torch.float32, torch.int32))
    inv = lambda a: 1 / a.float().norm(dim=1).clamp_min(1e-12)
    _cosine_topk_kernel[(triton.cdiv(M, bm), n_slices)](q, g, inv(q), inv(g), out_v, out_i, M, N, D, q.stride(0), g.stride(0),
                                                            slice_len, **cfg)
    return _merge(out_v.reshape(M, -1), out_i.reshape(M, -1).long(), k)


def check_input(M: int = 48, N: int = 320, D: int = 160, seed: int = 4321):
    """A top-k input exact in every dtype (fp16, bf16, TF32) and full of exact ties: entries -1, 0 or 1 and 16
    non-zeros (norm 4) in every gallery row, so a query's cosines are its integer dots times one constant.
    Query 0 and gallery row N - 1 are zero. Several tiles and D steps at every config, row blocks on a GPU."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (M, D), generator=g).float()
    gal = torch.zeros(N, D).scatter_(1, torch.rand(N, D, generator=g).argsort(dim=1)[:, :16],
                                     torch.randint(0, 2, (N, 16), generator=g).float() * 2 - 1)
    q[0], gal[-1] = 0, 0
    return q, gal


def self_test(dtype: torch.dtype, device, k: int = 10) -> dict:
    """The first-use check: the kernel against a float64 full sort of check_input(), at k = 10 (what
    evaluation asks) with two tiles per slice. The scores are exact, so every index must match."""
    q, gal = (a.to(device, dtype) for a in check_input())
    v, i = cosine_topk_triton(q, gal, k, slice_len=128)
    norm = lambda a: a.double().norm(dim=1).clamp_min(1e-12)
    s = (q.double() @ gal.double().T) / norm(q)[:, None] / norm(gal)[None, :]   # scaled after the exact dots
    v_ref, i_ref = _merge(s, torch.arange(len(gal), device=s.device).expand_as(s), k)
    wrong = float((i != i_ref).sum()) if i.shape == i_ref.shape else float("nan")
    return {"values": max_error(v, v_ref, 1e-5, scale=False), "indices": (wrong, 0.0)}
