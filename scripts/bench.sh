#!/usr/bin/env bash
# make bench: every package's benchmarks once, with the figures they report
# (p50/p99 in ms, RSS in MiB, CPU in % of one core, writes per pass...).
# BENCH=regexp narrows them; LONG=1 runs the long load test.
set -euo pipefail
cd "$(dirname "$0")/.."
pattern=${BENCH:-.}
export MESHAGENT_LONG=${MESHAGENT_LONG:-${LONG:-}}
# The Kubernetes benchmarks use the containerd lanes when they run
# (scripts/ci-containerd.sh v2 starts one); without them they skip.
if [ -z "${MESHAGENT_TEST_CONTAINERD:-}" ] && [ -S /run/meshagent-ci/containerd2/containerd.sock ]; then
  eval "$(scripts/ci-containerd.sh env)"
fi
echo "== meshagent benchmarks ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
# One package at a time: latency figures are not measured beside another
# package's load.
go test -p 1 -run '^$' -bench "$pattern" -benchtime 1x -timeout 30m ./... 2>&1 |
  grep -E '^(Benchmark|ok|FAIL|---|panic|\s+bench)' | grep -v 'no test files'
