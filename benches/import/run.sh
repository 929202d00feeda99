#!/usr/bin/env bash
# Import rate of `raftyard import`, from a docker-registry (CNCF Distribution) store filled
# through its API: COUNT small images, and one image of one LARGE_MIB layer. Each store is
# imported from its directory (the registry stopped) and through the API of the running
# registry, each into a fresh single raftyard node; times and rates are printed.
#   COUNT (default 2000), LARGE_MIB (default 1024), RAFTYARD_BIN (target/release/raftyard)
# Needs docker-registry (apt-get install docker-registry) and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${RAFTYARD_BIN:-target/release/raftyard}
count=${COUNT:-2000}
large=${LARGE_MIB:-1024}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not answer" >&2; exit 1; }

distribution() { # distribution ROOT PORT: starts docker-registry, its pid in $dist
    cat > "$work/dist-$2.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $1
http:
  addr: 127.0.0.1:$2
  secret: not-secret
YML
    docker-registry serve "$work/dist-$2.yml" >/dev/null 2>&1 &
    dist=$!; pids+=("$dist")
    wait_http "http://127.0.0.1:$2/v2/"
}
node() { # node NAME: starts a raftyard node, its URL in $url
    local p; p=$(port)
    "$bin" serve --listen "127.0.0.1:$p" --peer-listen "127.0.0.1:$(port)" --data-dir "$work/$1" >"$work/$1.log" 2>&1 &
    pids+=("$!"); url="http://127.0.0.1:$p"
    wait_http "$url/v2/"
}
timed() { # timed WHAT ARGS...: runs raftyard import, prints its time
    local t0=$EPOCHREALTIME
    "$bin" import "${@:2}" 2>/dev/null | tail -1
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v w="$1" 'BEGIN { printf "%s: %.1f s\n", w, b - a }'
}

for store in small large; do
    root="$work/store-$store"; p=$(port)
    distribution "$root" "$p"
    if [ $store = small ]; then
        echo "filling docker-registry with $count small images"
        python3 benches/import/fill.py "http://127.0.0.1:$p" small "$count" 8
    else
        echo "filling docker-registry with one image of a $large MiB layer"
        python3 benches/import/fill.py "http://127.0.0.1:$p" large "$large"
    fi
    node "$store-api"
    timed "$store, through the API of the running registry" --from-url "http://127.0.0.1:$p" --to "$url"
    kill "$dist"; wait "$dist" 2>/dev/null || true
    node "$store-dir"
    timed "$store, from the stopped registry's directory" --from-distribution "$root" --to "$url"
    timed "$store, from the directory again (all there)" --from-distribution "$root" --to "$url"
done
