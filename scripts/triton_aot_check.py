"""Compile every Triton kernel launch of the fused T2T-ViT for a GPU architecture, without a GPU.

    python scripts/triton_aot_check.py [--arch 90] [--dtypes bfloat16,float16,float32] [--json]

Runs the ops' Triton wrappers (forward and backward of soft_split, soft_split_layer_norm and performer_attention) at
the T2T module's shapes of T2T-ViT at 224x224 (three soft splits, two token layers) on CPU tensors, with Triton's
launcher replaced by a recorder; then compiles each distinct launch (kernel, argument types, constexprs, warps) ahead
of time with triton.compile for target cuda:<arch> through Triton's ptxas, and reads each kernel's registers, spills
and shared memory from ptxas -v. The soft split's kernels are autotuned on a GPU: every candidate config is compiled.
Prints one line per compile; exits 1 when a compile fails or exceeds the architecture's shared memory, or when one of
T2T-ViT's own launches spills more than SPILL_BUDGET bytes (an autotuned one: every candidate config).

This checks what a CPU can: that the installed Triton (the device machine pins its own version) lowers our kernels
for that GPU without register pressure. Correctness is the interpreter tests' job (tests/ops, TRITON_INTERPRET=1),
speed the GPU benchmarks'. TRITON_INTERPRET must be unset (the recorder needs compiled-kernel objects).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository's package

# spills a launch of the model may have (bytes per thread): ptxas spills a few registers' worth by its own choice to
# reach an occupancy step (8-20 B seen in the Performer's state kernel with 64-80 registers in use); register
# pressure shows as hundreds (276-1380 B with the former 64-row, 4-warp Performer tiles)
SPILL_BUDGET = 64
# shared memory a block may use, per architecture (bytes): sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB, sm_100 227 KB,
# sm_120 99 KB (the CUDA programming guide's per-block opt-in maxima); other architectures: the default 48 KB
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
# (input shape of the split (B, C, H, W), kernel, stride, padding) of the T2T module at 224x224 (DESIGN: stage 0 on the
# image, stages 1 and 2 on the 64-channel token images); B is 2: the batch only scales the grid
SPLITS = [((2, 3, 224, 224), (7, 7), (4, 4), (2, 2)), ((2, 64, 56, 56), (3, 3), (2, 2), (1, 1)),
          ((2, 64, 28, 28), (3, 3), (2, 2), (1, 1))]
# (B, T, E, m, the model's?) of the two Performer layers: 56x56 and 28x28 tokens, token_dim 64, kernel_ratio 0.5, at
# B = 128 (the reducing kernels sum several blocks per program) and 2 (one each); and other widths the op takes
PERFORMERS = [(128, 3136, 64, 32, True), (2, 3136, 64, 32, True), (128, 784, 64, 32, True), (2, 784, 32, 16, False),
              (2, 784, 128, 64, False)]


def record_launches(dtypes):
    """[(JITFunction, configs or None, args, kwargs, model)] for every kernel launch of the ops' Triton wrappers;
    model: the launch is one of T2T-ViT's (not another width the op takes)."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from t2t_kernels.ops.performer_attention import triton as performer
    from t2t_kernels.ops.soft_split import triton as split
    from t2t_kernels.ops.soft_split_layer_norm import triton as ssln

    launches, model = [], [True]  # model[0]: whether the launches being recorded are T2T-ViT's

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append((self, None, args, kwargs, model[0]))

    def record_autotuned(self, *args, **kwargs):
        launches.append((self.fn, self.configs, args, kwargs, model[0]))

    JITFunction.run, Autotuner.run = record_jit, record_autotuned
    # the wrappers take CPU tensors only under the interpreter: skip their device check, and give the soft split's
    # kernels their GPU (autotuned) launch, whose configs are all compiled
    for module in (split, ssln):
        module.check_tensor = lambda *args, **kwargs: None
    autotuned = {split._soft_split_fwd_kernel: split._autotuned_forward(),
                 split._soft_split_bwd_kernel: split._autotuned_backward()}

    for dtype in dtypes:
        model[0] = True  # every split is the model's
        for shape, k, s, p in SPLITS:
            x = torch.randn(shape).to(dtype)
            out = split.soft_split_forward(x, k, s, p)
            split.soft_split_backward(out, x.shape, k, s, p)
            split.soft_split_backward(out, x.shape, k, s, p, channels_last=True)
            features = out.shape[-1]
            weight, bias = torch.ones(features, dtype=dtype), torch.zeros(features, dtype=dtype)
            tokens, mean, rstd = ssln.soft_split_layer_norm_forward(x, weight, bias, k, s, p, 1e-5)
            ssln.soft_split_layer_norm_backward(tokens, x, weight, mean, rstd, k, s, p)
        for B, T, E, m, model[0] in PERFORMERS:
            q = torch.empty(B, T, E, dtype=dtype)
            w = torch.randn(m, E)
            y, kv_state, k_sum = performer.performer_attention_forward(q, q, q, w, 1e-8)
            performer.performer_attention_backward(y, q, q, q, w, kv_state, k_sum, 1e-8)

    result = []
    for fn, configs, args, kwargs, in_model in launches:
        base = fn.fn if isinstance(fn, Autotuner) else fn
        tuned = autotuned.get(base)
        if tuned is not None and configs is None:  # the interpreter-size launch of an autotuned kernel
            configs = tuned.configs
        result.append((base, configs, args, kwargs, in_model))
    return result


def signature_of(fn, args, kwargs):
    """(signature, constexprs, options) in triton.compile's terms for fn called with args/kwargs."""
    import torch

    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update(kwargs)
    triton_type = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                   torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64"}
    signature, constexprs = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = triton_type[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name} of type {type(value).__name__}")
    return signature, constexprs, options


def resources(ptx: str, ptxas: str) -> dict:
    """Registers, spills and stack of a kernel, from ptxas -v on its PTX (for the architecture the PTX targets)."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        text = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True).stderr
    numbers = {name: int(value) for value, name in
               re.findall(r"(\d+) (registers|bytes stack frame|bytes spill stores|bytes spill loads)", text)}
    return {"registers": numbers.get("registers"), "stack": numbers.get("bytes stack frame", 0),
            "spill_stores": numbers.get("bytes spill stores", 0), "spill_loads": numbers.get("bytes spill loads", 0)}


def compile_one(fn, signature, constexprs, options, target, ptxas, arch) -> dict:
    """Compiles one launch; the row says what it uses and what is wrong with it (error: a failure, spills: a note)."""
    import triton
    from triton.compiler import ASTSource

    row = {"kernel": fn.__name__, "arch": arch, "triton": triton.__version__,
           "types": [t for t in signature.values() if t.startswith("*")][:1], "constexprs": constexprs, **options,
           "error": None, "spills": 0}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target, options=options)
    except Exception as error:  # a compile error is this check's finding, reported with the launch
        causes, cause = [], error
        while cause is not None:  # Triton's CompilationError carries the reason as its cause
            causes.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__
        row["error"] = " <- ".join(causes)
        return row
    row.update(resources(compiled.asm["ptx"], ptxas), shared=compiled.metadata.shared)
    row["spills"] = max(row["spill_stores"], row["spill_loads"])
    if row["shared"] > MAX_SHARED.get(arch, 48 * 1024):
        row["error"] = f"shared memory {row['shared']} B over the limit"
    return row


def report(row: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(row, default=str), flush=True)
        return
    status = "ERR " if row["error"] else "note" if row["spills"] else "ok  "
    spills = f" spills {row['spill_stores']} B stored, {row['spill_loads']} B loaded" if row["spills"] else ""
    print(f"{status} {row['kernel']} {row['types']} {row['constexprs']} warps={row.get('num_warps')} "
          f"regs={row.get('registers')} shared={row.get('shared')}{spills} {row['error'] or ''}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--json", action="store_true", help="one JSON object per compile")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the check compiles kernels, the interpreter runs them in Python")

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # Triton bundles a second ptxas for Blackwell (sm_100 and later), which the older one does not know
    blackwell = os.path.join(bin_dir, "ptxas-blackwell")
    ptxas = blackwell if args.arch >= 100 and os.path.exists(blackwell) else os.path.join(bin_dir, "ptxas")
    target = GPUTarget("cuda", args.arch, 32)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    compiled_rows, failures = {}, 0
    for fn, configs, call_args, call_kwargs, in_model in record_launches(dtypes):
        rows = []
        for config in configs or [None]:
            kwargs = dict(call_kwargs)
            if config is not None:
                kwargs.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            signature, constexprs, options = signature_of(fn, call_args, kwargs)
            key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
                   tuple(sorted(options.items())))
            if key not in compiled_rows:
                compiled_rows[key] = compile_one(fn, signature, constexprs, options, target, ptxas, args.arch)
                report(compiled_rows[key], args.json)
            rows.append(compiled_rows[key])
        # a launch fails when a compile fails or overflows shared memory, and, for T2T-ViT's own launches, when it
        # spills more than SPILL_BUDGET; an autotuned one when all its candidate configs do (the tuner keeps the
        # fastest)
        if any(row["error"] for row in rows) or (in_model and all(row["spills"] > SPILL_BUDGET for row in rows)):
            failures += 1
            print(f"FAIL launch of {fn.__name__} {rows[0]['types']} {'(T2T-ViT shape)' if in_model else ''}: "
                  + "; ".join(sorted({row['error'] or 'spills' for row in rows})), flush=True)
    spilling = sum(row["spills"] > 0 for row in compiled_rows.values())
    print(f"{len(compiled_rows)} kernels compiled for cuda:{args.arch} with triton {triton.__version__} "
          f"({spilling} of them spill); {failures} launches failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
