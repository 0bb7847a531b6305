"""What the GPU compiler gives each kernel, and the predicted H100 roofline; no GPU needed (~40 s on 2 cores).

    python benchmarks/kernel_report.py [--allow-tf32]   # markdown to stdout; as if torch allowed TF32

The first table is compiled, not run (aot.py): registers, spills, shared memory, tensor-core instructions
and the occupancy they allow, on sm_80 and sm_90 in fp32, fp16 and bf16. The second is a lower bound from
published peaks (roofline.py), which gpu_check.py divides measured times by.
"""
import argparse
import sys

import aot
import roofline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--allow-tf32", action="store_true", help="compile as if torch allowed TF32 for fp32 matmuls")
    args = p.parse_args()
    if aot.backend_missing():
        sys.exit(f"error: cannot compile for CUDA here: {aot.backend_missing()}")
    rows = aot.compile_all(allow_tf32=args.allow_tf32)
    head = "kernel | dtype | arch | config | registers | spill bytes | shared KB | tensor-core ops | tf32 | blocks/SM"
    print(f"## Compiled, not run: resources per kernel\n\n| {head} | occupancy |\n" + "|---" * 4 + "|---:" * 4 +
          "|---|---:|---:|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | sm_{r['arch']} ({r['gpu']}) | {r['config']} | {r['registers']} | "
              f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['tensor_core_ops']} | "
              f"{'yes' if r['tf32'] else 'no'} | {r['blocks_per_sm']} | {r['occupancy']:.0%} |")
    print(f"\nmost spill bytes: {max(r['spill_bytes'] for r in rows)}; most registers: "
          f"{max(r['registers'] for r in rows)}; fp32 dots in TF32: {any(r['tf32'] for r in rows)}")
    print("\n## Predicted H100 SXM roofline (published peaks, not measured)\n\n| problem | dtype | matmul | "
          "top-k selection (CUDA cores) | memory | predicted bound |\n|---|---|---|---|---|---|")
    M, N, D, k = 1000, 200_000, 512, 10
    for dtype in ("float16", "float32"):
        block_m = next(int(r["constexprs"]["BLOCK_M"]) for r in rows if r["kernel"] == "cosine_topk" and
                       r["dtype"] == dtype and r["arch"] == 90)
        t = roofline.topk_terms(dtype, M, N, D, k, block_m, args.allow_tf32)
        print(f"| top-k {M:,} x {N:,} x {D}, k={k} | {dtype} | {t['flops'] / 1e9:.0f} GFLOP: {t['dot'] * 1e3:.2f} ms | "
              f"{t['select'] * 1e3:.2f} ms | {t['gallery_bytes'] / 1e6:.0f} MB once: {t['once'] * 1e3:.2f} ms "
              f"({t['row_blocks']}x without L2 reuse: {t['every'] * 1e3:.2f} ms) | {t['bound'] * 1e3:.2f} ms |")
    for B in (64, 1024):
        t = roofline.fused_terms("float32", B)
        print(f"| fused step, batch {B}, 512 -> 224 | float32 | {t['flops'] / 1e6:.1f} MFLOP: {t['dot'] * 1e6:.2f} us "
              f"| - | {t['fused_bytes'] / 1e6:.2f} MB fused vs {t['unfused_bytes'] / 1e6:.2f} MB unfused: "
              f"{t['memory'] * 1e6:.2f} us | {t['bound'] * 1e6:.2f} us + 1 launch vs 3 |")
    print("\nAssumptions: " + ", ".join(f"{k} {v:g}" for k, v in roofline.H100.items()) + "; the selection counts "
          "~6 instructions per score per pass.")


if __name__ == "__main__":
    main()
