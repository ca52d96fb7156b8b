"""Compile the engine's Triton kernel variants (fixed's kernel, the band's, the merge) for NVIDIA GPUs on a
machine without one (Triton's wheel carries ptxas) and print each variant's shared memory as JSON
lines, with the seconds each compile took. Run in a process without TRITON_INTERPRET (the engine's
kernels are compiled functions there, not interpreted ones):

    python tests/triton_aot.py 86 90
    TRITON_CACHE_DIR=$(mktemp -d) python tests/triton_aot.py 90   # cold compiles' times
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The kernels' feature strides (and the log-sum-exp's row stride): 1 at every launch.
FEATURE_STRIDES = {"sqd", "skd", "svd", "sod", "slm", "ssd", "so3", "sa3", "sb3"}
# (dtype, widest head dim, causal, skipped strides, seeded, 64-bit row offsets): every tile size
# kernel_variant picks, both causalities, the skip counts' branches, a seed or none (a union's
# other keys) and `wide_offsets`' both ways.
VARIANTS = [(torch.bfloat16, 64, True, 1, True, False), (torch.float16, 128, False, 4, False, False),
            (torch.bfloat16, 256, True, 0, False, False), (torch.float32, 64, False, 2, True, False),
            (torch.float32, 128, True, 0, False, False), (torch.float32, 256, True, 3, False, False),
            (torch.bfloat16, 128, True, 1, False, True), (torch.bfloat16, 64, True, 0, False, False)]
# (dtype, widest head dim, causal, seeded, 64-bit row offsets): every tile size the band's
# kernel_variant picks in the half precisions it takes, both causalities, a seed or none (a union's
# stride), `wide_offsets` both ways.
BAND_VARIANTS = [(torch.bfloat16, 64, True, False, False), (torch.float16, 128, False, True, False),
                 (torch.bfloat16, 256, True, False, False), (torch.bfloat16, 64, True, True, False),
                 (torch.bfloat16, 128, True, False, True)]
# (a's dtype, b's dtype, the output's dtype, features): the merges the engine makes, and the
# feature tiles' extremes.
MERGE_VARIANTS = [(torch.bfloat16, torch.bfloat16, torch.bfloat16, 64),
                  (torch.bfloat16, torch.float16, torch.float32, 128),
                  (torch.float32, torch.bfloat16, torch.float32, 16),
                  (torch.float32, torch.float32, torch.float32, 1024)]


def _compile(kernel, signature: dict[str, str], constexprs: dict, capability: int, options: dict | None = None,
             features: int = 64):
    """Triton's compiled `kernel` for this signature on compute capability `capability`, specialised
    as a launch with contiguous tensors of `features` per row is: the integers the kernel
    specialises on that are 1 (feature strides) as constants, the pointers it specialises on known
    to be 16-byte aligned, and with `features` a multiple of 16 the other integers known to be
    multiples of 16 too (which lets tiles load as vectors and pipeline, in more shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.kernels.device import TRITON_OPTIONS

    constexprs = {**constexprs, **{name: 1 for name in kernel.arg_names if name in FEATURE_STRIDES}}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    unspecialised = {*kernel.do_not_specialize, *kernel.do_not_specialize_on_alignment}
    attrs = {(at,): [["tt.divisibility", 16]] for at, name in enumerate(kernel.arg_names)
             if name not in constexprs and name not in unspecialised
             and (signature[name].startswith("*") or signature[name] == "i32" and features % 16 == 0)}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {**TRITON_OPTIONS, **(options or {})}  # the engine's launches pass them too
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def compile_variant(dtype: torch.dtype, head_dim: int, causal: bool, skips: int, capability: int, wide: bool = False,
                    seeded: bool = False):
    """`_fixed_kernel` for these inputs (row offsets in 64 bits with `wide`; continuing a seed of
    the inputs' dtype with `seeded`)."""
    from engine.kernels.triton_fixed import _fixed_kernel, kernel_variant

    variant = {**kernel_variant(dtype, head_dim, head_dim, causal, skips), "SEEDED": seeded, "WIDE_OFFSETS": wide}
    return _compile_attention(_fixed_kernel, dtype, head_dim, variant, capability)


def compile_band(dtype: torch.dtype, head_dim: int, causal: bool, capability: int, wide: bool = False,
                 variant: dict | None = None, seeded: bool = False):
    """`_band_kernel` for these inputs (row offsets in 64 bits with `wide`; `variant` replacing
    `kernel_variant`'s tiles; continuing a seed of the inputs' dtype with `seeded`)."""
    from engine.kernels.triton_band import _band_kernel, kernel_variant

    variant = {**kernel_variant(dtype, head_dim, head_dim), **(variant or {}), "CAUSAL": causal, "SEEDED": seeded,
               "WIDE_OFFSETS": wide}
    return _compile_attention(_band_kernel, dtype, head_dim, variant, capability)


def _compile_attention(kernel, dtype: torch.dtype, head_dim: int, variant: dict, capability: int):
    """An attention kernel (q, k, v, out in `dtype`, lse float32, the scale, integers) compiled
    with `variant`'s constexprs, warps and stages."""
    variant = dict(variant)
    options = {name: variant.pop(name) for name in ("num_warps", "num_stages")}
    pointer = "*" + TYPES[dtype]
    signature = {name: "constexpr" if name in variant else pointer if name in ("Q", "K", "V", "Out", "Seed")
                 else "*fp32" if name in ("Lse", "SeedLse") else "fp32" if name == "qk_scale" else "i32"
                 for name in kernel.arg_names}
    return _compile(kernel, signature, variant, capability, options, features=head_dim)


def compile_merge(a_dtype: torch.dtype, b_dtype: torch.dtype, out_dtype: torch.dtype, features: int, capability: int):
    """`_merge_kernel` for these inputs."""
    from engine.kernels.triton_merge import _merge_kernel, merge_tiles

    tiles = merge_tiles(features)
    pointers = {"Out": TYPES[out_dtype], "A": TYPES[a_dtype], "B": TYPES[b_dtype], "Lse": "fp32", "ALse": "fp32",
                "BLse": "fp32"}
    signature = {name: "constexpr" if name in tiles else "*" + pointers[name] if name in pointers else "i32"
                 for name in _merge_kernel.arg_names}
    return _compile(_merge_kernel, signature, tiles, capability, features=features)


# (the merged output's dtype, features): fixed's split decode steps' merge.
SPLIT_MERGE_VARIANTS = [(torch.bfloat16, 64), (torch.float16, 256), (torch.float32, 24)]


def compile_split_merge(dtype: torch.dtype, features: int, capability: int):
    """`_merge_splits_kernel` for these outputs."""
    from engine.kernels.triton_merge import _merge_splits_kernel, merge_tiles

    tiles = merge_tiles(features)
    pointers = {"Out": "fp32", "Lse": "fp32", "Merged": TYPES[dtype], "MergedLse": "fp32"}
    signature = {name: "constexpr" if name in tiles else "*" + pointers[name] if name in pointers else "i32"
                 for name in _merge_splits_kernel.arg_names}
    return _compile(_merge_splits_kernel, signature, tiles, capability, features=features)


def _report(kernel: str, capability: int, fields: dict, build) -> None:
    """Compile one variant (`build()`) and print it as a JSON line: its shared memory, and the seconds the
    compile took (a cold compile unless TRITON_CACHE_DIR already holds it)."""
    start = time.perf_counter()
    compiled = build()
    print(json.dumps({"kernel": kernel, "capability": capability, **fields, "shared": compiled.metadata.shared,
                      "seconds": round(time.perf_counter() - start, 2)}), flush=True)


def main(capabilities: list[int]) -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    warnings.filterwarnings("ignore")
    for capability in capabilities:
        for dtype, head_dim, causal, skips, seeded, wide in VARIANTS:
            fields = {"dtype": TYPES[dtype], "head_dim": head_dim, "causal": causal, "skips": skips, "seeded": seeded,
                      "wide": wide}
            _report("fixed", capability, fields,
                    partial(compile_variant, dtype, head_dim, causal, skips, capability, wide, seeded))
        for dtype, head_dim, causal, seeded, wide in BAND_VARIANTS:
            _report("band", capability, {"dtype": TYPES[dtype], "head_dim": head_dim, "causal": causal,
                                         "seeded": seeded, "wide": wide},
                    partial(compile_band, dtype, head_dim, causal, capability, wide, seeded=seeded))
        for a_dtype, b_dtype, out_dtype, features in MERGE_VARIANTS:
            _report("merge", capability, {"dtypes": [TYPES[a_dtype], TYPES[b_dtype], TYPES[out_dtype]],
                                          "features": features},
                    partial(compile_merge, a_dtype, b_dtype, out_dtype, features, capability))
        for dtype, features in SPLIT_MERGE_VARIANTS:
            _report("split merge", capability, {"dtype": TYPES[dtype], "features": features},
                    partial(compile_split_merge, dtype, features, capability))


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]])
