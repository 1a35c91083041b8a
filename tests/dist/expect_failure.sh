#!/usr/bin/env bash
# Runs a command that must fail: passes when it exits non-zero within MAX_SECONDS and its output
# matches REGEX (extended grep). Usage: expect_failure.sh MAX_SECONDS REGEX command...
max=$1 regex=$2
shift 2
start=$(date +%s)
out=$(timeout -k 5 "$((max + 30))" "$@" 2>&1)
rc=$?
elapsed=$(( $(date +%s) - start ))
echo "$out" | tail -n 30
echo "expect_failure: exit code $rc after ${elapsed} s"
if [ "$rc" -eq 0 ]; then echo "FAIL: the command succeeded"; exit 1; fi
if [ "$rc" -eq 124 ] || [ "$elapsed" -ge "$((max + 30))" ]; then echo "FAIL: the job hung until killed"; exit 1; fi
if [ "$elapsed" -gt "$max" ]; then echo "FAIL: took ${elapsed} s > ${max} s"; exit 1; fi
if ! echo "$out" | grep -Eq "$regex"; then echo "FAIL: output does not match /$regex/"; exit 1; fi
echo "PASS"
