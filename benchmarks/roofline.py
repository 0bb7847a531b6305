"""Predicted H100 SXM lower bounds on the kernels' times, from bytes moved, FLOPs and the CUDA-core work of
the running top-k over published peaks: not measurements. kernel_report.py prints them; gpu_check.py divides
measured times by them."""
import math

H100 = dict(hbm=3.35e12,      # bytes/s
            tc_fp16=989e12,   # FLOP/s, fp16/bf16 tensor cores, dense
            tc_tf32=494e12,   # FLOP/s, tf32 tensor cores, dense
            fp32=67e12,       # FLOP/s, fp32 FMA on CUDA cores (an FMA counts 2)
            ops=33.5e12,      # simple fp32/int32 instructions/s (128 lanes x 132 SMs x 1.98 GHz)
            launch=3e-6)      # seconds per launch on a busy stream: an assumption, not a spec
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def topk_terms(dtype: str, M: int, N: int, D: int, k: int, block_m: int, tf32: bool = False) -> dict:
    """Seconds: dot (the score matmul at peak), select (k passes of ~6 instructions per score), once (the
    gallery read once, the L2 serving the other row blocks), every (read once per row block); bound = the
    largest of dot, select and once."""
    flops, once = 2 * M * N * D, N * D * BYTES[dtype]
    peak = H100["tc_fp16"] if dtype != "float32" else H100["tc_tf32"] if tf32 else H100["fp32"]
    t = dict(flops=flops, gallery_bytes=once, dot=flops / peak, select=6 * k * M * N / H100["ops"],
             once=once / H100["hbm"], row_blocks=math.ceil(M / block_m))
    t["every"] = t["row_blocks"] * t["once"]
    t["bound"] = max(t["dot"], t["select"], t["once"])
    return t


def fused_terms(dtype: str, B: int, K: int = 512, N: int = 224) -> dict:
    """Seconds of the fused forward: x, W, b, temb in, y and z out (fused_bytes) against addmm, + temb and
    SiLU (unfused_bytes); bound = max(FLOPs at peak, fused bytes at HBM speed), one launch on top."""
    s, flops = BYTES[dtype], 2 * B * K * N
    fused, unfused = (B * K + N * K + N + 4 * B * N) * s, (B * K + N * K + N + 6 * B * N) * s
    peak = H100["tc_fp16"] if dtype != "float32" else H100["fp32"]
    t = dict(flops=flops, fused_bytes=fused, unfused_bytes=unfused, dot=flops / peak, memory=fused / H100["hbm"])
    t["bound"] = max(t["dot"], t["memory"])
    return t
