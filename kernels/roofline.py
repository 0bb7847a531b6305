"""Predicted H100 SXM rooflines of the kernels, from first principles: bytes moved, FLOPs and the
CUDA-core work of the running top-k, divided by published peak rates.

A lower bound on time, not a measurement. benchmarks/kernel_report.py prints these predictions
beside the compiled resources; benchmarks/gpu_check.py divides measured times by them.
"""
from __future__ import annotations

import math

# H100 SXM5 published peaks (dense): what the predictions divide by.
H100 = dict(hbm=3.35e12,            # bytes/s
            tc_fp16=989e12,         # FLOP/s, fp16/bf16 tensor cores
            tc_tf32=494e12,         # FLOP/s, tf32 tensor cores
            fp32=67e12,             # FLOP/s, fp32 FMA on CUDA cores (an FMA counts 2)
            ops=33.5e12,            # simple fp32/int32 instructions per second (128 lanes x 132 SMs x 1.98 GHz)
            launch=3e-6)            # seconds: a kernel launch on a busy stream (an assumption, not a spec)
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _peak(dtype: str, tf32: bool) -> float:
    """FLOP/s of a dot with inputs of dtype: tensor cores for fp16/bf16 (and fp32 in TF32), else FMA."""
    if dtype != "float32":
        return H100["tc_fp16"]
    return H100["tc_tf32"] if tf32 else H100["fp32"]


def topk_terms(dtype: str, M: int, N: int, D: int, k: int, block_m: int, tf32: bool = False) -> dict:
    """Roofline terms (seconds) of one exact top-k of M queries over N gallery rows of dim D.

    dot: the score matmul at peak; select: k passes of ~6 instructions per score (max, ==, min,
    where...) on CUDA cores; once: the gallery read once (the L2 serves the other row blocks);
    every: read once per block of block_m query rows, if the L2 does not. bound = the largest of
    dot, select and once: the predicted time.
    """
    flops = 2 * M * N * D
    once = N * D * BYTES[dtype]
    t = dict(flops=flops, gallery_bytes=once, dot=flops / _peak(dtype, tf32), select=6 * k * M * N / H100["ops"],
             once=once / H100["hbm"], every=math.ceil(M / block_m) * once / H100["hbm"], row_blocks=math.ceil(M / block_m))
    t["bound"] = max(t["dot"], t["select"], t["once"])
    return t


def fused_terms(dtype: str, B: int, K: int = 512, N: int = 224) -> dict:
    """Roofline terms (seconds) of the fused forward silu(x W^T + b + temb), x (B, K), W (N, K).

    fused_bytes: x, W, b, temb in; y and z out. unfused_bytes: addmm, then + temb, then SiLU.
    bound = max(FLOPs / peak, fused bytes / HBM bandwidth); one launch (H100["launch"]) comes on top.
    """
    s = BYTES[dtype]
    flops = 2 * B * K * N
    fused = (B * K + N * K + N + 2 * B * N + 2 * B * N) * s
    unfused = (B * K + N * K + N + B * N) * s + (3 * B * N) * s + (2 * B * N) * s
    peak = H100["tc_fp16"] if dtype != "float32" else H100["fp32"]
    t = dict(flops=flops, fused_bytes=fused, unfused_bytes=unfused, dot=flops / peak, memory=fused / H100["hbm"])
    t["bound"] = max(t["dot"], t["memory"])
    return t
