#!/usr/bin/env bash
# Idle cost of the local cluster (cluster/local/up.sh), measured from outside: CPU time each
# node spends in 10 s (utime + stime from /proc), its resident size, and its metadata bytes.
#   RAFTYARD_LOCAL_DIR  the cluster's directory (default: target/cluster-local)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${RAFTYARD_LOCAL_DIR:-target/cluster-local}
tck=$(getconf CLK_TCK)
declare -A before
nodes=()
for d in "$dir"/node*; do
    [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null || continue
    n=${d##*/}
    nodes+=("$n")
    before[$n]=$(awk '{print $14 + $15}' "/proc/$(cat "$d/pid")/stat")
done
sleep 10
for n in "${nodes[@]}"; do
    p=$(cat "$dir/$n/pid")
    after=$(awk '{print $14 + $15}' "/proc/$p/stat")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
    meta=$(du -sm "$dir/$n/data/meta" | cut -f1)
    echo "$n: cpu $(( (after - ${before[$n]}) * 1000 / tck )) ms per 10 s, rss $(( rss / 1024 )) MiB, meta ${meta} MiB"
done
