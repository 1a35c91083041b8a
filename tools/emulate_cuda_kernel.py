#!/usr/bin/env python3
"""Rewrites src/backend/cuda into C++ for the CPU emulator of tests/cuda_emu.

Usage: emulate_cuda_kernel.py --launchers CUDA_DIR OUT_DIR

Writes OUT_DIR/cuda_emu_kernels.h (kernels.h, cuda_check.h and common.cuh on
tests/cuda_emu/emu_runtime.h), one OUT_DIR/NAME_emu.cpp per file of LAUNCHER_FILES, kernels AND
launchers, and OUT_DIR/cuda_backend_emu.cpp (cuda_backend.cpp on the same header), so that the
tests and the emulated module (liblongtune_cuda_emu.so) run the launchers and the backend as the
GPU build does.

The kernels are kept as they are; only what a C++ compiler cannot build is replaced:
  - the CUDA includes: <cuda_bf16.h> goes (tests/cuda_emu/emu.h provides bf16), common.cuh and
    kernels.h become the generated cuda_emu_kernels.h;
  - the one inline-asm statement of attention.cu, mma.sync m16n8k16 bf16 -> f32, becomes a call
    of the emulator's lt::cuda_emu::mma_m16n8k16_bf16 (same operands);
  - `extern __shared__ ... smem[]` becomes a pointer to the emulator's dynamic shared memory,
    static `__shared__` arrays references to its per-block arrays, `__constant__` arrays globals;
  - `kernel<<<grid, block, shared, stream>>>(args);` becomes lt::cuda_emu::launch_on on that
    stream, the arguments captured by value (the launch may run later: emu_runtime.h).
#line directives keep compiler messages and debuggers on the lines of the source files.

Every pattern must occur exactly as often as expected: if a file changes shape (a new kernel or
launch, a second asm statement, another shared array, a runtime call the emulator lacks), this
script stops with a message naming what it did not find, rather than let the emulation tests
silently run less, or different, code than the GPU does. Exit status 1 then.
"""
import os
import re
import sys

MMA_INSTRUCTION = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                   "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n")
MMA_OPERANDS = [("+f", "c[0]"), ("+f", "c[1]"), ("+f", "c[2]"), ("+f", "c[3]"),
                ("r", "a[0]"), ("r", "a[1]"), ("r", "a[2]"), ("r", "a[3]"),
                ("r", "b0"), ("r", "b1")]
MMA_CALL = "lt::cuda_emu::mma_m16n8k16_bf16(c, a, b0, b1);"

SHARED_DECL = "extern __shared__ __align__(16) unsigned char smem[];"
SHARED_EMU = "unsigned char* smem = lt::cuda_emu::dynamic_shared();"


class PatternError(Exception):
    pass


def count_exactly(text, path, pattern, expected, what, regex=False):
    """The matches of pattern in text, which must number `expected`."""
    if regex:
        found = list(re.finditer(pattern, text, flags=re.S | re.M))
    else:
        found = [m for m in re.finditer(re.escape(pattern), text)]
    if len(found) != expected:
        raise PatternError(
            f"{path}: expected {expected} occurrence(s) of {what} "
            f"({'regex ' if regex else ''}`{pattern}`), found {len(found)}")
    return found


def blank_keeping_lines(text, start, end, replacement=""):
    """text with [start, end) replaced by replacement plus the newlines it held."""
    newlines = text.count("\n", start, end) - replacement.count("\n")
    if newlines < 0:
        raise PatternError("internal: a replacement spans more lines than the original")
    return text[:start] + replacement + "\n" * newlines + text[end:]


def replace_line(text, path, line, replacement, what):
    m = count_exactly(text, path, line, 1, what)[0]
    return blank_keeping_lines(text, m.start(), m.end(), replacement)


def check_includes(text, path, allowed):
    """Only standard headers and the `allowed` project headers may be included."""
    for m in re.finditer(r'^\s*#\s*include\s*([<"][^>"]*[>"])', text, flags=re.M):
        name = m.group(1)
        if name in allowed:
            continue
        if name.startswith('"') or name.startswith("<cu") or name.startswith("<nv"):
            raise PatternError(f"{path}: unexpected include {name}: the emulator does not "
                               "provide it (tests/cuda_emu/emu.h and this script must learn it)")


def rewrite_common(text, path):
    check_includes(text, path, {"<cuda_runtime.h>", '"backend/cuda/cuda_check.h"'})
    for token, what in [("__shared__", "shared memory"), ("__global__", "a kernel")]:
        count_exactly(text, path, token, 0, what)
    count_exactly(text, path, r"\basm\b", 0, "inline assembly", regex=True)
    text = replace_line(text, path, "#pragma once", "", "the include guard")
    text = replace_line(text, path, "#include <cuda_runtime.h>", "", "the CUDA runtime include")
    return replace_line(text, path, '#include "backend/cuda/cuda_check.h"', "",
                        "the CUDA error-check include")


def rewrite_mma(text, path):
    asm = count_exactly(text, path, r"\basm\b", 1, "inline assembly (the mma.sync)", regex=True)
    stmt = count_exactly(text, path, r"\basm\s+volatile\s*\((.*?)\);", 1,
                         "the inline-asm mma statement", regex=True)[0]
    if stmt.start() != asm[0].start():
        raise PatternError(f"{path}: the inline assembly is not an `asm volatile(...)` statement")
    template, _, operands = stmt.group(1).partition(":")
    instruction = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', template)).replace("\\n", "\n")
    if " ".join(instruction.split()) != " ".join(MMA_INSTRUCTION.split()):
        raise PatternError(f"{path}: the inline assembly is `{instruction.strip()}`, the emulator "
                           f"implements only `{MMA_INSTRUCTION.strip()}`")
    found = re.findall(r'"([=+]?[a-z])"\s*\(\s*([^)]*?)\s*\)', operands)
    if found != MMA_OPERANDS:
        raise PatternError(f"{path}: the mma operands are {found}, the emulator call "
                           f"`{MMA_CALL}` expects {MMA_OPERANDS}")
    return blank_keeping_lines(text, stmt.start(), stmt.end(), MMA_CALL)


# Per .cu file, its kernels with the number of launches of each, and the static
# `__shared__` and `__constant__` arrays it declares. A kernel, launch or array more or fewer,
# and the script stops: the test (tests/cuda_emu/test_kernels_emu.cpp) must learn it.
LAUNCHER_FILES = {
    "rmsnorm.cu": {"kernels": {"rmsnorm_forward_kernel": 1, "rmsnorm_backward_dinp_kernel": 1,
                               "rmsnorm_dweight_partial_kernel": 1,
                               "rmsnorm_dweight_finish_kernel": 1},
                   "shared": 1, "constant": 0},
    "rope.cu": {"kernels": {"rope_tables_kernel": 1, "rope_kernel": 2}, "shared": 0, "constant": 0},
    "swiglu.cu": {"kernels": {"swiglu_forward_kernel": 1, "swiglu_backward_kernel": 1},
                  "shared": 0, "constant": 0},
    "embedding.cu": {"kernels": {"embedding_forward_kernel": 1,
                                 "embedding_forward_bf16_kernel": 1,
                                 "embedding_backward_kernel": 1,
                                 "embedding_backward_ordered_kernel": 1},
                     "shared": 0, "constant": 0},
    "adamw.cu": {"kernels": {"adamw_kernel": 1}, "shared": 0, "constant": 0},
    "reduce.cu": {"kernels": {"sum_squares_kernel": 1, "scale_kernel": 1, "add_kernel": 1,
                              "bf16_to_f32_kernel": 1, "f32_to_bf16_kernel": 1,
                              "round_to_bf16_kernel": 1},
                  "shared": 1, "constant": 0},
    "nf4.cu": {"kernels": {"nf4_dequantize_kernel": 1}, "shared": 0, "constant": 2},
    # cuBLAS: tests/cuda_emu/emu_cublas.h. <cuda_bf16.h> goes (emu.h provides bf16).
    "linear.cu": {"kernels": {"add_bias_kernel": 1, "column_sum_partial_kernel": 1,
                              "column_sum_finish_kernel": 1, "to_bf16_2d_kernel": 1},
                  "shared": 1, "constant": 0, "drop_includes": ["<cuda_bf16.h>"]},
    "cross_entropy.cu": {"kernels": {"softmax_xent_kernel": 1}, "shared": 2, "constant": 0},
    "lora.cu": {"kernels": {"dropout_kernel": 2, "dropout_grad_kernel": 1}, "shared": 0,
                "constant": 0, "includes": ['"ops/lora_mask.h"']},
    # The flash attention: dynamic shared memory in three kernels, the one mma.sync statement.
    "attention.cu": {"kernels": {"flash_forward_kernel": 1, "dout_dot_out_kernel": 1,
                                 "flash_backward_kernel": 1, "flash_backward_dq_kernel": 1,
                                 "attention_merge_kernel": 1},
                     "shared": 0, "dynamic_shared": 3,
                     "mma": 1, "constant": 0, "drop_includes": ["<cuda_bf16.h>"]},
}

# The CUDA runtime and cuBLAS names tests/cuda_emu/emu_runtime.h provides.
RUNTIME_NAMES = {
    "cudaStream_t", "cublasHandle_t", "cudaError_t", "cudaSuccess", "cudaErrorInvalidValue",
    "cudaGetLastError", "cudaGetErrorString", "cudaStreamSynchronize", "cudaMemcpyAsync",
    "cudaMemsetAsync", "cudaMemcpyToSymbolAsync", "cudaMemcpyKind", "cudaMemcpyHostToHost",
    "cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost", "cudaMemcpyDeviceToDevice",
    "cudaMemcpyDefault", "cublasStatus_t", "cublasGetStatusString", "CUBLAS_STATUS_SUCCESS",
    # tests/cuda_emu/emu_cublas.h
    "cublasGemmEx", "cublasOperation_t", "CUBLAS_OP_N", "CUBLAS_OP_T", "cudaDataType_t",
    "CUDA_R_32F", "CUDA_R_16BF", "cublasComputeType_t", "CUBLAS_COMPUTE_32F",
    "CUBLAS_COMPUTE_32F_PEDANTIC", "cublasGemmAlgo_t", "CUBLAS_GEMM_DEFAULT",
    # attention.cu's launchers
    "cudaFuncSetAttribute", "cudaFuncAttributeMaxDynamicSharedMemorySize",
    # cuda_backend.cpp
    "cudaSetDevice", "cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaDeviceProp",
    "cudaDeviceGetAttribute", "cudaDevAttrComputeCapabilityMajor", "cudaMemGetInfo",
    "cudaStreamCreateWithFlags", "cudaStreamDestroy", "cudaStreamNonBlocking", "cudaEvent_t",
    "cudaEventCreateWithFlags", "cudaEventDestroy", "cudaEventDisableTiming", "cudaEventRecord",
    "cudaEventDefault", "cudaEventElapsedTime",
    "cudaStreamWaitEvent", "cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync",
    "cudaMallocHost", "cudaFreeHost", "cudaMemcpy2DAsync", "cublasCreate", "cublasDestroy",
    "cublasSetStream", "cublasSetMathMode", "CUBLAS_DEFAULT_MATH",
    # src/dist/nccl_comm.cpp (NCCL itself: tests/cuda_emu/emu_nccl.h)
    "cudaDeviceSynchronize", "cudaStreamQuery", "cudaErrorNotReady",
}

KERNELS_HEADER = "cuda_emu_kernels.h"


def strip_comments(text):
    """text without // and /* */ comments (for scans only; string literals are left alone)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def check_runtime_names(text, path):
    for name in sorted(set(re.findall(r"\b(cuda[A-Z]\w*|cublas[A-Z]\w*|CUBLAS_\w+|CUDA_\w+)\b",
                                      strip_comments(text)))):
        if name not in RUNTIME_NAMES:
            raise PatternError(f"{path}: uses {name}, which tests/cuda_emu/emu_runtime.h does "
                               "not provide")


def matching_paren(text, start, path):
    """The index just past the parenthesis that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise PatternError(f"{path}: unbalanced parentheses after offset {start}")


def split_top_level(text):
    """text split at the commas outside parentheses, brackets and braces."""
    parts, depth, current = [], 0, ""
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    return parts + [current]


def rewrite_launches(text, path, expected):
    """name<<<grid, block, shared, stream>>>(args); -> a synchronous lt::cuda_emu::launch of it."""
    counts = {k: 0 for k in expected}
    out, pos = [], 0
    for m in re.finditer(r"<<<", text):
        if m.start() < pos:
            raise PatternError(f"{path}: a kernel launch inside another launch's arguments")
        head = re.search(r"(\b\w+)\s*(<[^<>;{}()]*>)?\s*$", text[pos:m.start()])
        if not head:
            raise PatternError(f"{path}: a `<<<` without a kernel name before it")
        name, targs = head.group(1), head.group(2) or ""
        if name not in counts:
            raise PatternError(f"{path}: a launch of {name}, not among the kernels expected "
                               f"({', '.join(expected)})")
        counts[name] += 1
        close = text.find(">>>", m.end())
        if close < 0:
            raise PatternError(f"{path}: a `<<<` of {name} without `>>>`")
        config = split_top_level(text[m.end():close])
        if len(config) != 4:
            raise PatternError(f"{path}: a launch of {name} with {len(config)} configuration "
                               "argument(s); the rewrite expects <<<grid, block, shared, stream>>>")
        paren = re.match(r"\s*\(", text[close + 3:])
        if not paren:
            raise PatternError(f"{path}: a launch of {name} without arguments after `>>>`")
        open_at = close + 3 + paren.end() - 1
        end = matching_paren(text, open_at, path)
        semi = re.match(r"\s*;", text[end:])
        if not semi:
            raise PatternError(f"{path}: a launch of {name} not followed by `;`")
        end += semi.end()
        args = text[open_at + 1:end - semi.end() - 1]
        grid, block, shared, stream = config
        kernel = name + targs
        # Run on the stream's queue, maybe later (emu_runtime.h): arguments captured by value.
        call = (f'::lt::cuda_emu::launch_on({stream.strip()}, "{kernel}", '
                f"reinterpret_cast<const void*>(&{kernel}), dim3({grid.strip()}), "
                f"dim3({block.strip()}), {shared.strip()}, [=] {{ {kernel}({args}); }});")
        start = pos + head.start()
        out.append(text[pos:start])
        original = text[start:end]
        out.append(blank_keeping_lines(original, 0, len(original), call))
        pos = end
    out.append(text[pos:])
    for name, n in expected.items():
        if counts[name] != n:
            raise PatternError(f"{path}: expected {n} launch(es) of {name}, found {counts[name]}")
    return "".join(out)


def rewrite_static_shared(text, path, expected, dynamic, tag):
    """`__shared__ T name[A][B];` -> a reference to the emulator's per-block array, and
    `extern __shared__` (dynamic memory, SHARED_DECL only) -> the emulator's."""
    count_exactly(text, path, r"\b__shared__\b", expected + dynamic,
                  "__shared__ (static arrays and dynamic memory)", regex=True)
    count_exactly(text, path, r"\bextern\s+__shared__", dynamic, "dynamic shared memory",
                  regex=True)
    count_exactly(text, path, SHARED_DECL, dynamic, "the dynamic shared memory declaration")
    text = text.replace(SHARED_DECL, SHARED_EMU)
    pattern = (r"__shared__\s+(?:__align__\((\d+)\)\s+)?(\w[\w:]*)\s+(\w+)\s*"
               r"((?:\[[^\]\n]+\])+)\s*;")
    count_exactly(text, path, pattern, expected, "a static `__shared__ T name[...];` array",
                  regex=True)

    def emulated(m):
        align, type_, name, dims = m.groups()
        alignment = f"alignof({type_})"
        if align:
            alignment = f"std::max<size_t>({align}, {alignment})"
        return (f"auto& {name} = *static_cast<{type_}(*){dims}>(::lt::cuda_emu::static_shared("
                f'"{tag}:{name}", sizeof({type_}{dims}), {alignment}));')
    return re.sub(pattern, emulated, text, flags=re.S | re.M)


def rewrite_constant(text, path, expected):
    """`__constant__ T name[N];` -> a plain global (cudaMemcpyToSymbolAsync writes it)."""
    count_exactly(text, path, r"\b__constant__\b", expected, "__constant__", regex=True)
    pattern = r"__constant__\s+(\w[\w:]*\s+\w+\s*(?:\[[^\]\n]+\])*\s*;)"
    count_exactly(text, path, pattern, expected, "a `__constant__ T name[...];` array", regex=True)
    return re.sub(pattern, r"\1", text)


def rewrite_launcher_file(text, path, spec):
    """A .cu file, kernels and launchers, as a C++ source on the emulator."""
    drop = spec.get("drop_includes", [])
    check_includes(text, path, {'"backend/cuda/common.cuh"', '"backend/cuda/kernels.h"',
                                '"ops/nf4.h"', *spec.get("includes", []), *drop})
    check_runtime_names(text, path)
    if spec.get("mma"):
        text = rewrite_mma(text, path)
    else:
        count_exactly(text, path, r"\basm\b", 0, "inline assembly", regex=True)
    kernels = spec["kernels"]
    count_exactly(text, path, r"\b__global__\b", len(kernels), "a kernel (__global__)",
                  regex=True)
    for kernel in kernels:
        count_exactly(text, path, r"__global__[^;{]*?\b" + kernel + r"\(", 1,
                      f"the kernel {kernel}", regex=True)
    tag = os.path.basename(path)
    text = rewrite_static_shared(text, path, spec["shared"], spec.get("dynamic_shared", 0), tag)
    text = rewrite_constant(text, path, spec["constant"])
    text = rewrite_launches(text, path, kernels)
    text = replace_line(text, path, '#include "backend/cuda/common.cuh"',
                        f'#include "{KERNELS_HEADER}"', "the common.cuh include")
    text = replace_line(text, path, '#include "backend/cuda/kernels.h"', "",
                        "the launcher declarations include")
    for name in drop:
        text = replace_line(text, path, f"#include {name}", "", f"the include of {name}")
    return (f"// Generated by tools/emulate_cuda_kernel.py from {path}: do not edit.\n"
            f'#line 1 "{path}"\n{text}')


def rewrite_kernels_header(kernels_h, kernels_path, check_h, check_path, common, common_path):
    """kernels.h, cuda_check.h and common.cuh on emu_runtime.h, as one header."""
    check_includes(kernels_h, kernels_path, {"<cublas_v2.h>", "<cuda_runtime.h>",
                                             '"backend/backend.h"'})
    check_includes(check_h, check_path, {"<cublas_v2.h>", "<cuda_runtime.h>"})

    def without_cuda_includes(text, path):
        check_runtime_names(text, path)
        text = replace_line(text, path, "#pragma once", "", "the include guard")
        text = replace_line(text, path, "#include <cublas_v2.h>", "", "the cuBLAS include")
        return replace_line(text, path, "#include <cuda_runtime.h>", "",
                            "the CUDA runtime include")
    kernels_h = without_cuda_includes(kernels_h, kernels_path)
    check_h = without_cuda_includes(check_h, check_path)
    check_runtime_names(common, common_path)
    return ("// Generated by tools/emulate_cuda_kernel.py: do not edit. kernels.h, cuda_check.h "
            "and\n// common.cuh on the CUDA emulator (tests/cuda_emu/emu_runtime.h).\n"
            '#pragma once\n#include "emu_runtime.h"\n'
            f'#line 1 "{check_path}"\n{check_h}\n'
            f'#line 1 "{kernels_path}"\n{kernels_h}\n'
            f'#line 1 "{common_path}"\n{rewrite_common(common, common_path)}\n')


BACKEND_FILE = "cuda_backend.cpp"
NCCL_FILE = "../../dist/nccl_comm.cpp"  # relative to CUDA_DIR (src/backend/cuda): src/dist


def rewrite_nccl(text, path):
    """nccl_comm.cpp on emu_runtime.h and the MPI-backed NCCL of tests/cuda_emu/emu_nccl.h."""
    check_includes(text, path, {"<cuda_runtime.h>", "<nccl.h>", "<fmt/format.h>",
                                '"core/check.h"', '"core/error.h"', '"dist/comm.h"'})
    check_runtime_names(text, path)
    for token, what in [("__global__", "a kernel"), ("<<<", "a kernel launch")]:
        count_exactly(text, path, token, 0, what)
    text = replace_line(text, path, "#include <cuda_runtime.h>", "", "the CUDA runtime include")
    text = replace_line(text, path, "#include <nccl.h>", '#include "emu_nccl.h"',
                        "the NCCL include")
    return (f"// Generated by tools/emulate_cuda_kernel.py from {path}: do not edit.\n"
            f'#line 1 "{path}"\n{text}')


def rewrite_backend(text, path):
    """cuda_backend.cpp (host code only) on emu_runtime.h, through the generated kernels.h."""
    check_includes(text, path, {"<cuda_runtime.h>", '"backend/backend.h"',
                                '"backend/cuda/cuda_check.h"', '"backend/cuda/kernels.h"',
                                '"backend/cuda_module.h"', '"core/check.h"', '"core/error.h"',
                                '"ops/nf4.h"'})
    check_runtime_names(text, path)
    for token, what in [("__global__", "a kernel"), ("__device__", "device code"),
                        ("__shared__", "shared memory"), ("<<<", "a kernel launch")]:
        count_exactly(text, path, token, 0, what)
    count_exactly(text, path, r"\basm\b", 0, "inline assembly", regex=True)
    text = replace_line(text, path, "#include <cuda_runtime.h>", "", "the CUDA runtime include")
    text = replace_line(text, path, '#include "backend/cuda/cuda_check.h"', "",
                        "the CUDA error-check include")
    text = replace_line(text, path, '#include "backend/cuda/kernels.h"',
                        f'#include "{KERNELS_HEADER}"', "the launcher declarations include")
    return (f"// Generated by tools/emulate_cuda_kernel.py from {path}: do not edit.\n"
            f'#line 1 "{path}"\n{text}')


def main_launchers(cuda_dir, out_dir):
    outputs = {}
    try:
        def read(name):
            path = os.path.normpath(os.path.join(cuda_dir, name))
            with open(path) as f:
                return f.read(), path
        outputs[KERNELS_HEADER] = rewrite_kernels_header(
            *read("kernels.h"), *read("cuda_check.h"), *read("common.cuh"))
        for name, spec in LAUNCHER_FILES.items():
            text, path = read(name)
            outputs[name[:-len(".cu")] + "_emu.cpp"] = rewrite_launcher_file(text, path, spec)
        text, path = read(BACKEND_FILE)
        outputs["cuda_backend_emu.cpp"] = rewrite_backend(text, path)
        text, path = read(NCCL_FILE)
        outputs["nccl_comm_emu.cpp"] = rewrite_nccl(text, path)
    except (OSError, PatternError) as e:
        sys.stderr.write(f"emulate_cuda_kernel.py: error: {e}\n"
                         "The CUDA emulation test (tests/cuda_emu) cannot be generated; update "
                         "tools/emulate_cuda_kernel.py (and tests/cuda_emu) with the kernel.\n")
        for name in ([KERNELS_HEADER, "cuda_backend_emu.cpp", "nccl_comm_emu.cpp"] +
                     [n[:-3] + "_emu.cpp" for n in LAUNCHER_FILES]):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        return 1
    os.makedirs(out_dir, exist_ok=True)
    for name, text in outputs.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    return 0


def main(argv):
    if len(argv) != 4 or argv[1] != "--launchers":
        sys.stderr.write(__doc__)
        return 2
    return main_launchers(argv[2], argv[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
