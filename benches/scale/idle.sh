#!/usr/bin/env bash
# Idle cost of the local cluster (cluster/local/up.sh), measured from outside: CPU time each
# node spends per 10 s (utime + stime from /proc), its resident size, and its metadata bytes.
#   RAFTYARD_LOCAL_DIR  the cluster's directory (default: target/cluster-local)
#   IDLE_SECONDS        how long to measure (default 10; 60 evens out the 10 ms ticks)
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
secs=${IDLE_SECONDS:-10}
sleep "$secs"
for n in "${nodes[@]}"; do
    p=$(cat "$dir/$n/pid")
    after=$(awk '{print $14 + $15}' "/proc/$p/stat")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
    meta=$(du -sm "$dir/$n/data/meta" | cut -f1)
    echo "$n: cpu $(( (after - ${before[$n]}) * 1000 * 10 / tck / secs )) ms per 10 s, rss $(( rss / 1024 )) MiB, meta ${meta} MiB"
done
