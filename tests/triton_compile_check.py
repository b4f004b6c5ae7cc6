"""Compile the triton backend's kernels for a GPU target without a GPU; run as a script, not collected by pytest.

    python tests/triton_compile_check.py [VARIANT ...] [--all] [--arch 90] [--bb 64 --bh 128 --warps 8]

A variant is `CELL[-proj][-len][-single][-ieee][-resets][-zoneout|-keep]-DTYPE`, e.g. `lstm-proj-len-bf16`
(split-hidden mode unless `-single`; float32 products in TF32, torch's default for cuDNN's RNNs, unless `-ieee`;
the options: resets, zoneout with per-step masks, or zoneout with a constant weight).
For each it compiles `fwd_kernel` and `bwd_kernel` and checks the PTX: products in TF32 exactly where asked, and in the
split mode the barrier's acq_rel add and acquire spin on the counter. Prints one line per kernel; exits 1 on failure.
Must run without `TRITON_INTERPRET` (the kernels have to be real `JITFunction`s).
"""

import argparse
import importlib.util
import itertools
import pathlib
import sys

from seqfast.kernels.common import GATES

SHARED_LIMIT = 232448  # bytes per block on sm_90 (227 KiB)
RECURRENCE = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "triton" / "recurrence.py"


def load_kernels():
    spec = importlib.util.spec_from_file_location("_seqfast_triton_recurrence", RECURRENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_variant(rec, variant, arch, bb=None, bh=None, num_warps=4):
    """Compile both kernels of `variant` (block sizes as the launcher picks them unless given).

    Returns:
        `[(kernel name, shared memory bytes or None, problem or None)]`.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    parts = variant.split("-")
    cell, dt = parts[0], parts[-1]
    proj, has_len, split = "proj" in parts, "len" in parts, "single" not in parts
    resets, masks, zoneout = "resets" in parts, "zoneout" in parts, "zoneout" in parts or "keep" in parts
    G = GATES[cell]
    meta = dict(
        CELL=rec.CELLS[cell],
        G=G,
        SW=1 if G == 1 else 5 + (zoneout and cell == "lstm"),
        NS=2 if proj else 1,
        UPCAST=False,
        PRECISION="tf32" if dt == "fp32" and "ieee" not in parts else "ieee",
        REVERSE=has_len,
        BB=bb or (64 if split else 16),
        BH=bh or (16 if split else 128),
        BK=128 if split else 32 if dt == "fp32" else 64,
        NH=64 if split else 1,
        SPLIT=split,
        HAS_LEN=has_len,
        PROJ=proj,
        SAVE=True,
        HAS_BIAS=True,
        RESETS=resets,
        ZONEOUT=zoneout,
        KEEP_T=masks,
    )
    absent = set() if has_len else {"p_len"}
    absent |= set() if proj else {"p_whr", "p_rbuf", "p_dhs", "p_pbuf"}
    absent |= set() if cell == "lstm" else {"p_c0", "p_cT", "p_dcT", "p_dc0"}
    absent |= set() if cell == "gru" else {"p_dgh"}
    absent |= set() if resets else {"p_zero"}
    absent |= set() if masks else {"p_kh", "p_kc"}
    absent |= set() if masks and cell == "lstm" else {"p_kc"}
    results = []
    for kernel in (rec.fwd_kernel, rec.bwd_kernel):
        fn = kernel.fn
        signature, constexprs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in meta or name in absent:
                signature[name] = "constexpr"
                constexprs[(i,)] = meta.get(name)
            elif name == "p_len":
                signature[name] = "*i64"
            elif name == "p_sync":
                signature[name] = "*i32"
            elif name == "p_zero":
                signature[name] = "*u8"
            elif name in ("kh", "kc"):
                signature[name] = "fp32"
            elif name in ("p_saved", "p_dhs"):
                signature[name] = "*fp32"
            elif name.startswith("p_"):
                signature[name] = f"*{dt}"
            else:
                signature[name] = "i32"
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        except Exception as e:  # noqa: BLE001 - report every failing variant
            results.append((fn.__name__, None, f"{type(e).__name__}: {str(e)[:2000]}"))
            continue
        ptx, shared = compiled.asm["ptx"], compiled.metadata.shared
        problems = []
        if shared > SHARED_LIMIT:
            problems.append(f"{shared} bytes of shared memory exceed {SHARED_LIMIT}")
        has_tf32 = "tf32" in ptx
        if (meta["PRECISION"] == "tf32") != has_tf32:
            problems.append(f"products asked in {meta['PRECISION']}, the PTX {'has' if has_tf32 else 'has no'} tf32")
        if split:
            if "atom.global.gpu.acq_rel.add" not in ptx:
                problems.append("no acq_rel atomic add")
            if "ld.global.gpu.acquire" not in ptx and "atom.global.gpu.acquire" not in ptx:
                problems.append("no acquire spin")
        results.append((fn.__name__, shared, "; ".join(problems) or None))
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--all", action="store_true", help="every cell x proj x lengths x mode x {fp32, bf16}")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--bb", type=int, help="batch block (default: 64 split, 16 single)")
    parser.add_argument("--bh", type=int, help="hidden block (default: 16 split, 128 single)")
    parser.add_argument("--warps", type=int, default=4)
    args = parser.parse_args()
    variants = list(args.variants)
    if args.all:
        for cell, dt, mode, has_len in itertools.product(GATES, ("fp32", "bf16"), ("", "-single"), ("", "-len")):
            for proj in ("", "-proj") if cell == "lstm" else ("",):
                variants.append(f"{cell}{proj}{has_len}{mode}-{dt}")
    import triton

    print(f"triton {triton.__version__} sm_{args.arch}")
    rec = load_kernels()
    failed = 0
    for variant in variants:
        for name, shared, problem in compile_variant(rec, variant, args.arch, args.bb, args.bh, args.warps):
            failed += problem is not None
            line = f"{'FAIL' if problem else 'ok'} {variant} {name} shared={shared}"
            print(line + (f": {problem}" if problem else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
