#!/usr/bin/env bash
# Installs the Debian packages longtune builds and tests with, when any is missing (needs root or
# sudo); Slurm and munge serve the srun launch test (tests/dist/srun_train.sh).
# --fuzz also installs clang and its sanitizer/libFuzzer runtime for scripts/fuzz.sh (optional).
set -euo pipefail
pkgs=(cmake ninja-build g++ pkg-config libopenblas-dev libopenblas-openmp-dev libomp-dev nlohmann-json3-dev libcli11-dev
      libfmt-dev libpcre2-dev libicu-dev libyaml-cpp-dev libgtest-dev libgmock-dev
      libopenmpi-dev openmpi-bin slurm-wlm munge python3 python3-venv
      libprotobuf-dev protobuf-compiler libcurl4-openssl-dev libcrcutil-dev libxxhash-dev
      libboost-context-dev)
[ "${1:-}" = "--fuzz" ] && pkgs+=(clang libclang-rt-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
