#!/usr/bin/env bash
# Builds longtune for a GPU machine here and packs what scripts/gpu-check.sh needs there into
# .gpu-bundle/ (ignored by git), so that a lent GPU machine, which has the CUDA toolkit and
# PyTorch but none of longtune's other libraries and no package registry, runs the check without
# building anything:
#   build.tar.xz  the executables, tests, benchmarks, liblongtune.so, liblongtune_cuda.so and
#                 ctest's files of build-gpu/ (-march=x86-64-v3, CUDA sm_90 by default)
#   deps.tar.xz   every shared library they load that is neither glibc's nor one that a CUDA
#                 machine brings (driver, cuBLAS, cuBLASLt, NCCL: too large to carry)
#   data.tar.xz   ../shared/data (the tests and the training comparison read it)
#   manifest      the paths the build was made at, the commit, the glibc it needs
# The bundle is at most about 40 MiB, within what the device tool carries (64 MiB with the
# working tree). Usage:
#   scripts/gpu-bundle.sh            (LONGTUNE_GPU_ARCH=90 by default; "80;90" for A100 too)
# then, through the device tool: carry [".gpu-bundle"], command
#   bash scripts/gpu-check.sh "$OUT/check"
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=$ROOT/build-gpu
BUNDLE=$ROOT/.gpu-bundle
ARCH=${LONGTUNE_GPU_ARCH:-90}
bash scripts/install-deps.sh
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
# x86-64-v3 (AVX2, FMA): the GPU machine's processor is not this one; native could use
# instructions it lacks.
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTUNE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DLONGTUNE_MARCH=x86-64-v3 >/dev/null
# What gpu-check runs (the executable, the CUDA module, the conformance suite, the benchmarks):
# about half the build of everything; LONGTUNE_GPU_BUNDLE_ALL=1 builds and packs every test.
if [ "${LONGTUNE_GPU_BUNDLE_ALL:-0}" = 1 ]; then
  ninja -C "$BUILD" -j"$(nproc)"
else
  ninja -C "$BUILD" -j"$(nproc)" longtune longtune_cuda test_backend_ops bench_train bench_gpu
fi
[ -f "$BUILD/liblongtune_cuda.so" ] || { echo "gpu-bundle: the CUDA module was not built" >&2; exit 1; }

rm -rf "$BUNDLE.tmp"
mkdir -p "$BUNDLE.tmp/deps"
STAGE=$BUNDLE.tmp
cd "$BUILD"
# The build outputs ctest and the check use (object files stay behind).
outputs=(longtune liblongtune.so liblongtune_cuda.so CTestTestfile.cmake)
for f in test_* bench_*; do [ -f "$f" ] && [ -x "$f" ] && outputs+=("$f"); done
for f in *_tests.cmake *_include.cmake; do [ -f "$f" ] && outputs+=("$f"); done
tar -cJf "$STAGE/build.tar.xz" "${outputs[@]}"
elves=()
for f in "${outputs[@]}"; do
  [ "$(head -c4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] && elves+=("$f")
done

# Libraries: what the dynamic loader finds for them here, less glibc and the CUDA machine's own.
if ldd "${elves[@]}" 2>/dev/null | grep -q 'not found'; then
  echo "gpu-bundle: a library the build needs is not found here:" >&2
  ldd "${elves[@]}" 2>/dev/null | grep 'not found' | sort -u >&2
  exit 1
fi
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libcuda\.so|libcublas\.so|libcublasLt\.so|libnccl\.so)'
ldd "${elves[@]}" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
  while read -r name path; do
    [[ "$name" =~ $skip ]] && continue
    case "$path" in "$BUILD"/*) continue ;; esac
    cp -L "$path" "$STAGE/deps/$name"
  done
# Open MPI opens its components at run time from its own folder; the single-process runs of the
# check never start MPI (comm.cpp initialises it only under a launcher), so none are carried.
(cd "$STAGE/deps" && tar -cJf ../deps.tar.xz ./*)
rm -rf "$STAGE/deps"

DATA=$ROOT/../shared/data
if [ -d "$DATA" ]; then
  tar -C "$ROOT/.." -cJf "$STAGE/data.tar.xz" shared/data
else
  echo "gpu-bundle: no ../shared/data beside the checkout: the bundle carries no test data" >&2
fi
# The newest glibc symbol version the binaries ask for: the GPU machine must have it.
glibc=$(cd "$BUILD" && objdump -T "${elves[@]}" 2>/dev/null |
  grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
{
  echo "source_dir=$ROOT"
  echo "build_dir=$BUILD"
  echo "commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no | grep -q . && echo yes || echo no)"
  echo "made=$(date -u +%FT%TZ)"
  echo "cuda_arch=$ARCH"
  echo "sources=$(bash "$ROOT/scripts/gpu-check.sh" --sources-hash)"
  echo "glibc=${glibc#GLIBC_}"
} > "$STAGE/manifest"
cd "$ROOT"
rm -rf "$BUNDLE"
mv "$STAGE" "$BUNDLE"
du -sh "$BUNDLE"/* | sed 's/^/gpu-bundle: /'
total=$(du -sk "$BUNDLE" | cut -f1)
echo "gpu-bundle: $((total / 1024)) MiB in $BUNDLE ($(cat "$BUNDLE/manifest" | tr '\n' ' '))"
