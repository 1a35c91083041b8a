#!/usr/bin/env python3
"""Rewrites src/backend/cuda/attention.cu into a C++ header for the CPU emulator of tests/cuda_emu.

Usage: emulate_cuda_kernel.py ATTENTION_CU COMMON_CUH OUT_H

The kernels are kept as they are; only what a C++ compiler cannot build is replaced:
  - the CUDA includes: <cuda_bf16.h> goes (tests/cuda_emu/emu.h provides bf16), common.cuh is
    inlined without its CUDA includes, kernels.h becomes ops/attention.h (AttentionShape, which
    make_params reads);
  - the one inline-asm statement, mma.sync m16n8k16 bf16 -> f32, becomes a call of the emulator's
    lt::cuda_emu::mma_m16n8k16_bf16 (same operands);
  - `extern __shared__ ... smem[]` becomes a pointer to the emulator's shared memory;
  - the host launchers after the anonymous namespace are dropped (the test launches the kernels
    as they do).
#line directives keep compiler messages and debuggers on the lines of the .cu file.

Every pattern must occur exactly as often as expected: if attention.cu changes shape (a new
kernel, a second asm statement, static __shared__ arrays, a launcher moved into the anonymous
namespace), this script stops with a message naming what it did not find, rather than let the
emulation test silently run less, or different, code than the GPU does. Exit status 1 then.
"""
import os
import re
import sys

# The kernels the emulation test launches; a new one must be added to the test.
KERNELS = ["flash_forward_kernel", "dout_dot_out_kernel", "flash_backward_kernel",
           "attention_merge_kernel"]

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


def rewrite_attention(text, path, common, common_path):
    check_includes(text, path, {"<cuda_bf16.h>", '"backend/cuda/common.cuh"',
                                '"backend/cuda/kernels.h"'})
    # Host code starts where the anonymous namespace closes; nothing of the device may follow.
    end = count_exactly(text, path, r"^\}  // namespace$", 1,
                        "the end of the anonymous namespace (the launchers follow it)",
                        regex=True)[0]
    kept, dropped = text[:end.start()], text[end.start():]
    for token, what in [("__global__", "a kernel"), ("__device__", "device code"),
                        ("__shared__", "shared memory")]:
        count_exactly(dropped, path + " (after the anonymous namespace)", token, 0, what)
    count_exactly(kept, path, "namespace lt::cuda {", 1, "the opening of namespace lt::cuda")
    count_exactly(kept, path, "namespace {", 1, "the opening of the anonymous namespace")
    count_exactly(kept, path, "<<<", 0, "a kernel launch in device code")
    count_exactly(kept, path, "__global__", len(KERNELS), "a kernel (__global__)")
    for kernel in KERNELS:
        count_exactly(kept, path, r"__global__[^;{]*?\b" + kernel + r"\(", 1,
                      f"the kernel {kernel}", regex=True)
    # Any other __shared__ (a static array) would become one array per emulated thread.
    count_exactly(kept, path, "__shared__", 2, "__shared__ (the two kernels' dynamic memory)")
    count_exactly(kept, path, SHARED_DECL, 2, "the dynamic shared memory declaration")
    kept = kept.replace(SHARED_DECL, SHARED_EMU)
    kept = rewrite_mma(kept, path)
    kept = replace_line(kept, path, "#include <cuda_bf16.h>", "", "the bf16 include")
    kept = replace_line(kept, path, '#include "backend/cuda/kernels.h"',
                        '#include "ops/attention.h"', "the launcher declarations include")
    # common.cuh in place of its include, then back to the .cu file's own line numbers.
    include = count_exactly(kept, path, '#include "backend/cuda/common.cuh"', 1,
                            "the common.cuh include")[0]
    line = kept.count("\n", 0, include.start()) + 1
    inlined = (f'#line 1 "{common_path}"\n{common}\n#line {line + 1} "{path}"')
    kept = kept[:include.start()] + inlined + kept[include.end():]
    return (f'#line 1 "{path}"\n{kept}'
            "}  // namespace (emulator: the launchers are dropped)\n}  // namespace lt::cuda\n")


def main(argv):
    if len(argv) != 4:
        sys.stderr.write(__doc__)
        return 2
    _, cu_path, common_path, out_path = argv
    try:
        with open(cu_path) as f:
            cu = f.read()
        with open(common_path) as f:
            common = f.read()
        body = rewrite_attention(cu, cu_path, rewrite_common(common, common_path), common_path)
    except (OSError, PatternError) as e:
        sys.stderr.write(f"emulate_cuda_kernel.py: error: {e}\n"
                         "The CUDA emulation test (tests/cuda_emu) cannot be generated; update "
                         "tools/emulate_cuda_kernel.py (and tests/cuda_emu) with the kernel.\n")
        # No stale header from an earlier attention.cu may be built in its place.
        if os.path.exists(out_path):
            os.remove(out_path)
        return 1
    header = ("// Generated by tools/emulate_cuda_kernel.py from " + cu_path + ": do not edit.\n"
              "// The kernels of attention.cu on the CPU emulator of tests/cuda_emu/emu.h.\n"
              "#pragma once\n#include \"emu.h\"\n" + body)
    with open(out_path, "w") as f:
        f.write(header)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
