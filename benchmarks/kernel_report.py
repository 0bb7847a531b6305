"""What the GPU compiler gives each kernel, and a predicted H100 roofline. No GPU needed.

    python benchmarks/kernel_report.py              # markdown tables to stdout (~40 s on 2 cores)
    python benchmarks/kernel_report.py --allow-tf32 # as if torch.backends.fp32_precision = "tf32"

Every kernel is compiled for sm_80 (A100) and sm_90 (H100) at the configs its launcher picks
(kernels/aot.py), in fp32, fp16 and bf16. The first table is read from the cubins with the
cuobjdump shipped in the triton wheel: registers per thread, stack bytes (spills to local
memory), shared memory per block, tensor-core instructions (HMMA / HGMMA) in the SASS, and the
occupancy those allow. These are COMPILED, NOT RUN figures.

The second table is a PREDICTED roofline for an H100 SXM from first principles (bytes moved,
FLOPs, the CUDA-core work of the running top-k; kernels/roofline.py), with the published peak
rates there. It is a lower bound on time, not a measurement: benchmarks/gpu_check.py divides
times measured on a GPU by it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels import aot, roofline  # noqa: E402

H100 = roofline.H100


def resource_table(rows) -> str:
    out = ["| kernel | dtype | arch | config | registers | spill bytes | shared KB | tensor-core ops | tf32 | "
           "blocks/SM | occupancy |", "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        gpu = aot.SM_LIMITS[r["arch"]]["name"]
        out.append(f"| {r['kernel']} | {r['dtype']} | sm_{r['arch']} ({gpu}) | {r['config']} | {r['registers']} | "
                   f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['tensor_core_ops']} | "
                   f"{'yes' if r['tf32'] else 'no'} | {r['blocks_per_sm']} | {r['occupancy']:.0%} |")
    return "\n".join(out)


def topk_prediction(dtype: str, rows, tf32: bool, M=1000, N=200_000, D=512, k=10) -> list[str]:
    """Roofline terms of one exact top-k over the gallery (kernels/roofline.py); the largest is the predicted bound."""
    row = next(r for r in rows if r["kernel"] == "cosine_topk" and r["dtype"] == dtype and r["arch"] == 90)
    t = roofline.topk_terms(dtype, M, N, D, k, int(row["constexprs"]["BLOCK_M"]), tf32)
    return [f"| top-k {M:,} x {N:,} x {D}, k={k} | {dtype} | {t['flops'] / 1e9:.0f} GFLOP: {t['dot'] * 1e3:.2f} ms | "
            f"{t['select'] * 1e3:.2f} ms | {t['gallery_bytes'] / 1e6:.0f} MB once: {t['once'] * 1e3:.2f} ms "
            f"({t['row_blocks']}x without L2 reuse: {t['every'] * 1e3:.2f} ms) | {t['bound'] * 1e3:.2f} ms |"]


def fused_prediction(dtype: str, B: int, K=512, N=224) -> list[str]:
    t = roofline.fused_terms(dtype, B, K, N)
    return [f"| fused step, batch {B}, {K} -> {N} | {dtype} | {t['flops'] / 1e6:.1f} MFLOP: {t['dot'] * 1e6:.2f} us | "
            f"- | {t['fused_bytes'] / 1e6:.2f} MB fused vs {t['unfused_bytes'] / 1e6:.2f} MB unfused: "
            f"{t['memory'] * 1e6:.2f} us | {t['bound'] * 1e6:.2f} us + 1 launch ({H100['launch'] * 1e6:.0f} us) vs 3 launches |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--allow-tf32", action="store_true", help="compile as if torch allowed TF32 for fp32 matmuls")
    args = p.parse_args()
    missing = aot.backend_missing()
    if missing:
        sys.exit(f"error: cannot compile for CUDA here: {missing}")
    rows = aot.compile_all(allow_tf32=args.allow_tf32)
    print("## Compiled, not run: resources per kernel (kernels/aot.py configs)\n")
    print(resource_table(rows))
    worst = max(rows, key=lambda r: r["registers"])
    print(f"\nspill bytes: {max(r['spill_bytes'] for r in rows)} in every config; most registers: {worst['registers']} "
          f"({worst['kernel']} {worst['dtype']} sm_{worst['arch']}); fp32 dots in TF32: "
          f"{'yes' if any(r['tf32'] for r in rows) else 'no'}")
    print("\n## Predicted H100 SXM roofline (not measured: peaks from the published specs)\n")
    print("| problem | dtype | matmul | top-k selection (CUDA cores) | memory | predicted bound |")
    print("|---|---|---|---|---|---|")
    for dtype in ("float16", "float32"):
        print("\n".join(topk_prediction(dtype, rows, args.allow_tf32)))
    for B in (64, 1024):
        print("\n".join(fused_prediction("float32", B)))
    print("\nAssumptions: " + ", ".join(f"{k} {v:g}" for k, v in H100.items()) +
          ". The selection term counts ~6 instructions per score per pass; the fused step at batch 64 is launch-bound.")


if __name__ == "__main__":
    main()
