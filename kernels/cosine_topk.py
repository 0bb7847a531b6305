"""Batched cosine similarity with a streaming top-k: never materialises the (M, N) scores.

    cosine_topk(queries (M, D), gallery (N, D), k) -> values (M, k), indices (M, k)

Values are cosines in descending order; ties go to the lower gallery index; a zero vector has
cosine 0 with everything (not NaN). Two implementations with the same contract:

- Triton (CUDA): each program owns BLOCK_M queries and one slice of the gallery. For each
  gallery tile it computes the scores (tl.dot, inverse norms applied in the epilogue) and
  merges them into a running per-row top-k: up to k times, take each row's best remaining
  tile score (value, then lowest index) and, where it beats the row's current worst kept
  entry, put it in that entry's place. Each slice writes its k candidates; a second stage
  merges slices with a stable sort in torch.
- Chunked torch (CPU, and the reference): the same running top-k over gallery chunks sized
  so that one chunk's scores stay under a memory budget.

Memory: the full score matrix of a 1,000 x 1,000,000 problem is 4 GB in fp32; both paths keep
O(M * (chunk + k)) instead.

cosine_topk runs the first-use check (kernels/first_use.py, self_test below) before the Triton
path's first result for a dtype and device in a process, and takes the chunked torch path for
the rest of the process if the kernel fails it or a launch raises.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, first_use, fp32_dot_precision

NAME = "cosine_topk"


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / |x| per row, with 0 for zero rows so that their cosines are 0, not NaN."""
    n = x.float().norm(dim=1)
    return torch.where(n > 0, 1.0 / n.clamp(min=1e-30), torch.zeros_like(n))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm in fp32; zero rows stay zero."""
    return x.float() * _inverse_norms(x)[:, None]


def _merge(vals: torch.Tensor, idx: torch.Tensor, k: int):
    """Keep the k best of each row by (value descending, index ascending)."""
    order = torch.sort(idx, dim=1, stable=True).indices          # index ascending first ...
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]  # ... then value
    return vals.gather(1, order), idx.gather(1, order)


def _chunk_topk(s: torch.Tensor, k: int):
    """The k best of each row of a score chunk s (M, C) by (value descending, index ascending).

    torch.topk is fast but orders equal values arbitrarily. Asking it for k + 1 says where that
    matters: when the (k+1)-th value is below the k-th, the k returned are exactly the values
    >= the k-th, and only their order needs fixing (a sort of (M, k)); rows where the two are
    equal (a tie across the k-th place, e.g. duplicated gallery items) are redone with a full
    (value, index) sort of that row.
    """
    M, C = s.shape
    if C <= k:
        return _merge(s, torch.arange(C, device=s.device).expand(M, C), C)
    v, i = torch.topk(s, k + 1, dim=1)                                   # (M, k+1), value descending
    tied = (v[:, k] == v[:, k - 1]).nonzero().flatten()
    v, i = _merge(v[:, :k], i[:, :k], k)
    if len(tied):
        v[tied], i[tied] = _merge(s[tied], torch.arange(C, device=s.device).expand(len(tied), C), k)
    return v, i


def cosine_topk_torch(queries: torch.Tensor, gallery: torch.Tensor, k: int, budget_bytes: int = 16 << 20):
    """The chunked torch path: a running top-k over gallery chunks of at most budget_bytes of scores.

    Chunks of a few thousand rows keep the (M, C) score block in cache, and one score buffer is
    reused: a fresh multi-MB block per chunk costs page faults. Memory is O(M (C + k) + C D)
    whatever the gallery size. On 2 CPU cores this runs at ~1.4x faiss-cpu's IndexFlatIP
    (README, Speed on a CPU); the matmuls alone take ~1.05x.
    """
    M, N = queries.shape[0], gallery.shape[0]
    k = min(k, N)
    q = _unit(queries)                                                   # (M, D), normalised once
    chunk = min(8192, budget_bytes // (4 * max(M, 1)))
    if chunk >= 512:  # the CPU GEMM runs ~35% slower at 4,194 gallery rows than at 4,096
        chunk -= chunk % 512
    chunk = max(k + 1, chunk)
    scores = torch.empty(M, chunk, device=q.device)
    best_v = torch.empty(M, 0, device=q.device)
    best_i = torch.empty(M, 0, dtype=torch.long, device=q.device)
    for start in range(0, N, chunk):
        g = _unit(gallery[start:start + chunk])                         # (C, D)
        s = torch.mm(q, g.T, out=scores) if len(g) == chunk else q @ g.T  # (M, C)
        v, i = _chunk_topk(s, k)
        # the running best holds only lower indices, so _merge's (value, index) order is exact
        best_v, best_i = _merge(torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1), k)
    return best_v, best_i


@triton.jit
def _cosine_topk_kernel(q_ptr, g_ptr, qinv_ptr, ginv_ptr, out_v_ptr, out_i_ptr, M, N, D, slice_len,
                        stride_qm, stride_qd, stride_gn, stride_gd,
                        K: tl.constexpr, KP: tl.constexpr, CAST_FP32: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.arange(0, KP)
    # running top-k per row; empty slots hold -inf and distinct indices past the gallery
    best_v = tl.full((BLOCK_M, KP), float("-inf"), tl.float32)
    best_i = tl.zeros((BLOCK_M, KP), tl.int32) + N + slot[None, :]
    if KP > K:  # padding slots are never candidates for replacement: pin them at +inf
        best_v = tl.where(slot[None, :] < K, best_v, float("inf"))
    qinv = tl.load(qinv_ptr + rm, mask=rm < M, other=0.0)
    start = pid_s * slice_len
    for n0 in range(start, start + slice_len, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_ptr + rm[:, None] * stride_qm + rd[None, :] * stride_qd,
                        mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)
            g = tl.load(g_ptr + rn[None, :] * stride_gn + rd[:, None] * stride_gd,
                        mask=(rn[None, :] < N) & (rd[:, None] < D), other=0.0)
            if CAST_FP32:
                q, g = q.to(tl.float32), g.to(tl.float32)
            acc += tl.dot(q, g, input_precision=PRECISION)
        ginv = tl.load(ginv_ptr + rn, mask=rn < N, other=0.0)
        s = acc * qinv[:, None] * ginv[None, :]
        s = tl.where((rn[None, :] < N) & (rn[None, :] < start + slice_len), s, float("-inf"))
        for _ in range(K):
            # this tile's best remaining score per row, lowest index among equal scores
            top_v = tl.max(s, axis=1)
            top_i = tl.min(tl.where(s == top_v[:, None], rn[None, :], 2147483647), axis=1)
            # the row's worst kept entry: lowest value, highest index among equal values
            worst_v = tl.min(best_v, axis=1)
            worst_i = tl.max(tl.where(best_v == worst_v[:, None], best_i, -1), axis=1)
            better = (top_v > worst_v) | ((top_v == worst_v) & (top_i < worst_i))
            replace = (best_v == worst_v[:, None]) & (best_i == worst_i[:, None]) & better[:, None]
            best_v = tl.where(replace, top_v[:, None], best_v)
            best_i = tl.where(replace, top_i[:, None], best_i)
            s = tl.where(rn[None, :] == top_i[:, None], float("-inf"), s)
    n_slices = tl.num_programs(1)
    offs = (rm[:, None] * n_slices + pid_s) * K + slot[None, :]
    keep = (rm[:, None] < M) & (slot[None, :] < K)
    tl.store(out_v_ptr + offs, best_v, mask=keep)
    tl.store(out_i_ptr + offs, best_i, mask=keep)


K_MAX = 32  # larger k: the running top-k no longer fits in registers; such calls take the torch path


def topk_config(M: int, D: int, k: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """The kernel's constexprs and num_warps for M queries of dim D, top-k, input dtype.

    The launcher and the compile tests / resource report (kernels/aot.py) both call this, so
    what is checked for the GPU is what runs on it. GPU tiles were chosen from that report
    (README, Kernels): the running top-k keeps a (BLOCK_M, KP) value and index array live beside
    the (BLOCK_M, BLOCK_N) score tile, and 64 x 64 x 64 tiles with 4 warps sat at the 255-register
    cap and spilled. fp32 (an IEEE dot on CUDA cores) takes 16 query rows per program; fp16/bf16
    (tensor cores) take 32 with 8 warps. No config spills on sm_80 or sm_90, for any k <= K_MAX.
    """
    if interpret:
        BM, BN, BD, warps = 32, 128, 128, 4       # the interpreter's cost is per program and loop step
    elif dtype == torch.float32:
        BM, BN, BD, warps = 16, 64, 64, 4
    else:
        BM, BN, BD, warps = 32, 64, 64, 8
    return dict(K=k, KP=triton.next_power_of_2(k), CAST_FP32=interpret or dtype == torch.float32,
                PRECISION=fp32_dot_precision(), BLOCK_M=min(BM, max(16, triton.next_power_of_2(M))), BLOCK_N=BN,
                BLOCK_D=min(BD, max(16, triton.next_power_of_2(D))), num_warps=warps)


def cosine_topk_triton(queries: torch.Tensor, gallery: torch.Tensor, k: int, slice_len: int | None = None):
    M, D = queries.shape
    N = gallery.shape[0]
    k = min(k, N)
    if k > K_MAX:
        return cosine_topk_torch(queries, gallery, k)
    cfg = topk_config(M, D, k, queries.dtype)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if slice_len is None:  # enough slices to fill the GPU, each a whole number of tiles
        slice_len = BN * max(1, triton.cdiv(triton.cdiv(N, BN), max(1, 512 // triton.cdiv(M, BM))))
    slice_len = triton.cdiv(slice_len, BN) * BN
    n_slices = triton.cdiv(N, slice_len)
    out_v = torch.empty(M, n_slices, k, device=queries.device, dtype=torch.float32)
    out_i = torch.empty(M, n_slices, k, device=queries.device, dtype=torch.int32)
    _cosine_topk_kernel[(triton.cdiv(M, BM), n_slices)](
        queries, gallery, _inverse_norms(queries), _inverse_norms(gallery), out_v, out_i, M, N, D, slice_len,
        queries.stride(0), queries.stride(1), gallery.stride(0), gallery.stride(1), **cfg)
    return _merge(out_v.reshape(M, -1), out_i.reshape(M, -1).long(), k)


def cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, backend: str = "auto", strict: bool = False):
    """Top-k cosine matches of each query in the gallery: values (M, k) fp32, indices (M, k) int64.

    queries (M, D), gallery (N, D); k is capped at N. backend "auto" uses Triton for CUDA
    tensors and the chunked torch path otherwise; "triton" and "torch" force one. The Triton
    path's first call for a (dtype, device) in a process runs the first-use check (module
    docstring); if the kernel fails it, or a launch raises, the torch path answers for the rest
    of the process after one KernelFallbackWarning, or kernels.KernelCheckError is raised when
    strict (diffgap passes strict=True for KERNELS = "triton"). k above K_MAX always takes the
    torch path. ValueError: shapes that do not fit, k < 1, an unknown backend.
    """
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"cosine_topk: queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} do not fit")
    if k < 1:
        raise ValueError(f"cosine_topk: k must be at least 1, got {k}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"cosine_topk: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and queries.is_cuda)
    if use_triton and min(k, gallery.shape[0]) <= K_MAX and first_use.usable(NAME, queries, strict, self_test):
        try:
            return cosine_topk_triton(queries, gallery, k)
        except Exception as e:  # noqa: BLE001 - a compile or launch error at these shapes: warn once (or raise)
            first_use.failed(NAME, queries, e, strict)
    return cosine_topk_torch(queries, gallery, k)


def check_input(M: int = 48, N: int = 320, D: int = 160, seed: int = 4321):
    """A top-k input whose scores are exact in every dtype, with many exact ties.

    Entries are -1, 0 or 1, so fp16, bf16 and TF32 hold them exactly and every dot product is
    an exact small integer; every gallery row has 16 non-zeros (norm 4), so a query's cosines
    are its dot products times one constant: equal dots tie exactly (the kernel must return the
    lower index) and different ones differ by at least 1 / (4 |q|) > 0.01. Query 0 and gallery
    row N - 1 are zero (cosine 0, not NaN). The default shape has several row blocks and
    gallery slices at every config (GPU 16 or 32 query rows and 64 gallery rows per tile,
    interpreter 32 and 128) and several D tiles.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (M, D), generator=g).float()
    gal = torch.zeros(N, D)
    cols = torch.rand(N, D, generator=g).argsort(dim=1)[:, :16]
    gal.scatter_(1, cols, (torch.randint(0, 2, (N, 16), generator=g) * 2 - 1).float())
    q[0] = 0
    gal[N - 1] = 0
    return q, gal


def self_test(dtype: torch.dtype, device: torch.device, k: int = 10) -> dict:
    """The first-use check of top-k: the kernel against a float64 full-matrix sort on check_input().

    k = 10 is what evaluation asks. Returns {"values": (max abs error, 1e-5), "indices":
    (indices that differ, 0)}: the inputs are exact, so every index must match, ties included.
    Raises what a launch raises.
    """
    q, gal = check_input()
    qd, gd = q.to(device=device, dtype=dtype), gal.to(device=device, dtype=dtype)
    v, i = cosine_topk_triton(qd, gd, k)
    q64, g64 = qd.double(), gd.double()
    inv = lambda x: torch.where(x.norm(dim=1) > 0, 1 / x.norm(dim=1).clamp(min=1e-300), torch.zeros(()).double().to(x.device))
    s = (q64 @ g64.T) * inv(q64)[:, None] * inv(g64)[None, :]
    v_ref, i_ref = _merge(s, torch.arange(s.shape[1], device=s.device).expand_as(s), k)
    wrong = float((i.long() != i_ref).sum().item()) if i.shape == i_ref.shape else float("nan")
    return {"values": first_use.max_error(v, v_ref, 1e-5, scale=False), "indices": (wrong, 0.0)}


def cosine_topk_reference(queries: torch.Tensor, gallery: torch.Tensor, k: int):
    """Full score matrix, then a (value, index) sort: the reference the tests compare against."""
    s = _unit(queries) @ _unit(gallery).T
    return _merge(s, torch.arange(gallery.shape[0], device=s.device).expand_as(s), min(k, gallery.shape[0]))
