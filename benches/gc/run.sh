#!/usr/bin/env bash
# Garbage collection of a large store, side by side with docker-registry's.
#
# COUNT small images (a layer and a config each: 2 × COUNT blobs) are written into a
# docker-registry (CNCF Distribution) filesystem store (benches/gc/layout.py) and imported into a three-node raftyard cluster (cluster/local/up.sh, on
# its ports 5001-5003, 5101-5103, 6000, 7000, 7500); then every other image is deleted from both,
# through the API. docker-registry's `garbage-collect` runs with the registry stopped, as its
# documentation requires. `raftyard gc` runs online while CLIENTS clients push small images
# through node 2: their push times before and during the collection are compared. Prints both
# collections' times, the blob files before and after on every store, and the push latencies.
#   COUNT (default 50000), CLIENTS (default 4), RAFTYARD_BIN (default target/release/raftyard)
# Needs docker-registry (apt-get install docker-registry), python3 and curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${RAFTYARD_BIN:-target/release/raftyard}
count=${COUNT:-50000}
clients=${CLIENTS:-4}
work=$(mktemp -d)
export RAFTYARD_BIN=$bin RAFTYARD_LOCAL_DIR=$work/cluster
dist=
cleanup() {
    [ -n "$dist" ] && kill "$dist" 2>/dev/null || true
    touch "$work/stop"
    cluster/local/down.sh >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
wait_http() { for _ in $(seq 1 300); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not answer" >&2; exit 1; }
files() { find "$1" -type f "${@:2}" | wc -l; }

root=$work/distribution
cat > "$work/dist.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $root
  delete:
    enabled: true
http:
  addr: 127.0.0.1:5900
  secret: not-secret
YML
start_dist() { docker-registry serve "$work/dist.yml" >"$work/dist.log" 2>&1 & dist=$!; wait_http http://127.0.0.1:5900/v2/; }
stop_dist() { kill "$dist"; wait "$dist" 2>/dev/null || true; dist=; }

echo "== a docker-registry store of $count images ($((2 * count)) blobs)"
python3 benches/gc/layout.py "$root" "$count"
start_dist
curl -fs -o /dev/null -H 'accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:5900/v2/bench/r1/manifests/t1" || { echo "docker-registry does not serve the store" >&2; exit 1; }
stop_dist
echo "== a three-node raftyard cluster, the same content imported"
cluster/local/up.sh >/dev/null
t=$(now); "$bin" import --from-distribution "$root" --to http://127.0.0.1:5001 2>/dev/null | tail -1
echo "import: $(since "$t") s"
imported=$(now)

echo "== deleting every other image from both"
start_dist
python3 benches/gc/delete.py http://127.0.0.1:5900 "$count"
stop_dist
python3 benches/gc/delete.py http://127.0.0.1:5001 "$count"

echo "== docker-registry garbage-collect (the registry stopped)"
before=$(files "$root/docker/registry/v2/blobs" -name data)
t=$(now); docker-registry garbage-collect "$work/dist.yml" >"$work/gc.log" 2>&1
echo "docker-registry garbage-collect: $(since "$t") s; blob files $before -> $(files "$root/docker/registry/v2/blobs" -name data)"

echo "== raftyard gc, online, while $clients clients push through node 2"
# the imported images are older than the grace by now: nothing but them is collected
while [ "$(awk -v a="$imported" -v b="$(now)" 'BEGIN { print (b - a < 65) }')" = 1 ]; do sleep 1; done
for n in 1 2 3; do echo "node $n blob files before: $(files "$work/cluster/node$n/data/blobs")"; done
echo before > "$work/phase"
python3 benches/gc/pushlat.py 127.0.0.1:5002 "$clients" "$work/phase" "$work/stop" > "$work/lat.json" &
lat=$!
sleep 15
echo during > "$work/phase"
t=$(now); "$bin" gc --grace 60 --node 127.0.0.1:5102 --json > "$work/gc.json"
took=$(since "$t")
echo after > "$work/phase"
python3 - "$work/gc.json" "$took" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"raftyard gc: {sys.argv[2]} s; {r['links_removed']} links, {r['blobs_removed']} blobs ({r['bytes']} bytes) left the registry")
PY
sleep 10
touch "$work/stop"; wait "$lat"
expected=$(( $(files "$work/cluster/node1/data/blobs") ))
for n in 1 2 3; do
    # each node sweeps within seconds; files written in the last minute wait for its next pass
    for _ in $(seq 1 90); do
        swept=$(curl -fs http://127.0.0.1:500$n/metrics | awk '/^raftyard_gc_files_removed_total/ { print $2 }')
        [ "${swept:-0}" -ge "$((count - 2))" ] && break
        sleep 1
    done
    echo "node $n blob files after: $(files "$work/cluster/node$n/data/blobs") (swept ${swept:-0})"
done
python3 - "$work/lat.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for p in ("before", "during", "after"):
    if p in r: print(f"pushes {p:>6} the collection: {r[p]['pushes']:>5}, median {r[p]['p50_ms']} ms, p99 {r[p]['p99_ms']} ms")
print(f"failed pushes: {r['error_count']} {r['errors'][:3]}")
PY
