"""Compiles every kernel for sm_80 (A100) and sm_90 (H100) without a GPU, at the configs its launcher picks,
with the ptxas of the triton wheel, and reads registers, stack (spills), shared memory and tensor-core
instructions from the cubin with the wheel's cuobjdump: what the interpreter that runs the tests cannot
show. Compiled, not run. `python benchmarks/aot.py` prints one JSON row per (case, arch); compile_all() runs
it as a child with TRITON_INTERPRET=0, because under the interpreter @triton.jit yields no compilable kernel.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kernels import K_MAX, fused_mlp, topk  # noqa: E402

ARCHS, DTYPES = (80, 90), ("float32", "float16", "bfloat16")
SM = {80: ("A100", 65536, 64, 32, 167936), 90: ("H100", 65536, 64, 32, 233472)}  # regs, warps, blocks, shared/SM
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cases(dtypes=DTYPES) -> list[dict]:
    """The project's shapes: top-k of 1,000 queries (D = 512) over 200,000 items at k = 10 (evaluation) and
    K_MAX; the default denoiser's hidden step, batch 64, 512 -> 224, storing z or not; its backward."""
    out = []
    for name in dtypes:
        dt, p = getattr(torch, name), {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[name]
        for k in (10, K_MAX):
            cfg = topk.topk_config(1000, 512, k, dt, interpret=False)
            args = dict(q_ptr=p, g_ptr=p, qinv_ptr="*fp32", ginv_ptr="*fp32", out_v_ptr="*fp32", out_i_ptr="*i32",
                        M=1000, N=200_000, D=512, stride_q=512, stride_g=512, slice_len=cfg["BLOCK_N"] * 50)
            out.append(dict(kernel="cosine_topk", fn=topk._cosine_topk_kernel, dtype=name, args=args, cfg=cfg,
                            config=f"k={k} BLOCK {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_D']}"))
        fwd, bwd = fused_mlp.fused_config(64, 224, 512, dt, interpret=False)
        for store_z in (True, False):
            args = dict(x_ptr=p, w_ptr=p, b_ptr=p, t_ptr=p, y_ptr=p, z_ptr=p, M=64, N=224, K=512, stride_x=512, stride_w=512, stride_t=224)
            out.append(dict(kernel="fused_fwd", fn=fused_mlp._fused_fwd_kernel, dtype=name, args=args,
                            cfg=dict(fwd, STORE_Z=store_z), config=f"store_z={int(store_z)} BLOCK "
                            f"{fwd['BLOCK_M']}x{fwd['BLOCK_N']}x{fwd['BLOCK_K']}"))
        args = dict(dy_ptr=p, z_ptr=p, dz_ptr=p, part_ptr="*fp32", M=64, N=224)
        out.append(dict(kernel="fused_bwd", fn=fused_mlp._fused_bwd_kernel, dtype=name, args=args, cfg=bwd,
                        config=f"BLOCK {bwd['BLOCK_M']}x{bwd['BLOCK_N']}"))
    return out


def backend_missing() -> str | None:
    """Why compiling for CUDA cannot run here, or None."""
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"triton has no backends module ({e})"
    return None if "nvidia" in backends and os.path.isfile(CUOBJDUMP) else "no NVIDIA backend or cuobjdump in triton"


def compile_case(case: dict, arch: int) -> dict:
    """One report row. Arguments are specialised as a launch would be: pointers 16-byte aligned, ints that
    are multiples of 16 marked so, ints equal to 1 made constants (triton/runtime/jit.py)."""
    from triton.backends.compiler import GPUTarget
    cfg = dict(case["cfg"])
    warps = cfg.pop("num_warps")
    signature, consts, attrs = {}, dict(cfg), {}
    for i, name in enumerate(case["fn"].arg_names):
        value = cfg.get(name, case["args"].get(name))
        if name in cfg or value == 1:
            signature[name], consts[name] = "constexpr", value
        else:
            signature[name] = value if isinstance(value, str) else "i32"
            if isinstance(value, str) or value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=case["fn"], signature=signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        open(path, "wb").write(kernel.asm["cubin"])
        dump = lambda flag: subprocess.run([CUOBJDUMP, flag, path], capture_output=True, text=True, check=True).stdout
        usage, sass = dump("-res-usage"), dump("-sass")
    regs, stack = (int(re.search(rf"\b{f}:(\d+)", usage).group(1)) for f in ("REG", "STACK"))
    gpu, sm_regs, sm_warps, sm_blocks, sm_shared = SM[arch]
    shared = kernel.metadata.shared
    blocks = min(sm_regs // (-(-regs * 32 // 256) * 256) // warps, sm_shared // (shared + 1024), sm_warps // warps,
                 sm_blocks)   # registers go per warp in units of 256; 1 KB of shared memory is reserved per block
    return dict(kernel=case["kernel"], dtype=case["dtype"], arch=arch, gpu=gpu, config=f"{case['config']}, {warps}w",
                constexprs={k: str(v) for k, v in case["cfg"].items()}, registers=regs, spill_bytes=stack,
                shared_bytes=shared, tensor_core_ops=len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass)),
                tf32=".tf32" in kernel.asm["ptx"], blocks_per_sm=blocks, occupancy=blocks * warps / sm_warps)


def compile_all(archs=ARCHS, dtypes=DTYPES, allow_tf32: bool = False) -> list[dict]:
    """Every case for every arch, compiled in a child process (module docstring)."""
    cmd = [sys.executable, __file__, "--archs", *map(str, archs), "--dtypes", *dtypes] + ["--allow-tf32"] * allow_tf32
    res = subprocess.run(cmd, env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"AOT compilation failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Compile every kernel case for CUDA; print JSON rows.")
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    p.add_argument("--allow-tf32", action="store_true", help="as if torch allowed TF32 for fp32 matmuls")
    a = p.parse_args()
    # one API, never both: mixing torch's new and legacy TF32 setters makes the legacy getters raise
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if a.allow_tf32 else "ieee"
    else:
        matmul.allow_tf32 = a.allow_tf32
    json.dump([compile_case(c, arch) for c in cases(a.dtypes) for arch in a.archs], sys.stdout)
