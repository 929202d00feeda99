#!/usr/bin/env bash
# Starts a three-node raftyard cluster on 127.0.0.1: registry ports 5001-5003, peer ports
# 5101-5103, and a tunnel relay every node's agent dials into: control 127.0.0.1:7000, the
# shared registry endpoint 127.0.0.1:6000, one endpoint per node on 127.0.0.1:6001-6003, the
# dashboard on http://127.0.0.1:7500. Idempotent: only what is not running is started (so it
# also restarts a killed node or relay). Returns once every node answers /v2/, all agree on a
# leader and every agent is connected to the relay.
#
#   --with-backup       also node 4 as a backup (registry 127.0.0.1:5004, peer 127.0.0.1:5104),
#                       added with `raftyard cluster add-backup` (docs/recovery.md)
#   --auth MODE         token or basic: authentication on (docs/security.md); an admin user
#                       `admin` is made, its password in <dir>/admin-password. Default: none.
#   RAFTYARD_BIN        binary to run (default: target/release/raftyard)
#   RAFTYARD_LOCAL_DIR  where node<N>/{config.toml,data,log,pid} live (default: target/cluster-local)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${RAFTYARD_BIN:-target/release/raftyard}
dir=${RAFTYARD_LOCAL_DIR:-target/cluster-local}
nodes=(1 2 3)
with_backup=false
auth=none
usage() { echo "usage: $0 [--with-backup] [--auth token|basic]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --with-backup) with_backup=true ;;
        --auth) [ $# -ge 2 ] || usage; auth=$2; shift ;;
        --auth=*) auth=${1#--auth=} ;;
        *) usage ;;
    esac
    shift
done
case "$auth" in none|token|basic) ;; *) usage ;; esac

[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release -p raftyard, or set RAFTYARD_BIN)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }

# A process runs if the pid in DIR/pid is alive and not a zombie waiting to be reaped.
running() {
    [ -f "$1/pid" ] || return 1
    local st
    st=$(ps -o stat= -p "$(cat "$1/pid")" 2>/dev/null) || return 1
    [[ "$st" != Z* ]]
}

# launch DIR ARGS...: runs "$bin ARGS..." detached, logging to DIR/log, its pid in DIR/pid.
launch() {
    local d=$1
    shift
    setsid nohup "$bin" "$@" >>"$d/log" 2>&1 < /dev/null &
    echo $! > "$d/pid"
}

# --- relay: a CA and certificate for 127.0.0.1, one token per node (made once) ---
r="$dir/relay"
mkdir -p "$r"
[ -f "$r/tls/ca.pem" ] || "$bin" certs self-signed --host 127.0.0.1 --host localhost --out "$r/tls" >/dev/null
for n in "${nodes[@]}"; do
    [ -f "$r/token-node$n" ] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$r/token-node$n"; chmod 600 "$r/token-node$n"; }
done
cat > "$r/relay.toml" <<TOML
# Written by cluster/local/up.sh
[relay]
listen = "127.0.0.1:7000"
dashboard = "127.0.0.1:7500"
tls = { cert = "$(realpath "$r")/tls/cert.pem", key = "$(realpath "$r")/tls/key.pem" }

[[service]]
name = "registry"
bind = "127.0.0.1:6000"
$(for m in "${nodes[@]}"; do printf '\n[[service]]\nname = "registry-%s"\nbind = "127.0.0.1:600%s"\n' "$m" "$m"; done)
$(for m in "${nodes[@]}"; do printf '\n[[agent]]\nname = "node%s"\ntoken_file = "%s/token-node%s"\nservices = ["registry", "registry-%s"]\n' "$m" "$(realpath "$r")" "$m" "$m"; done)
TOML
if running "$r"; then
    echo "relay already running (pid $(cat "$r/pid"))"
else
    launch "$r" relay --config "$r/relay.toml"
    echo "relay started (pid $(cat "$r/pid"), control 127.0.0.1:7000, registry 127.0.0.1:6000, nodes 127.0.0.1:6001-600${#nodes[@]}, dashboard http://127.0.0.1:7500)"
fi

for n in "${nodes[@]}"; do
    d="$dir/node$n"
    mkdir -p "$d/data"
    cat > "$d/config.toml" <<TOML
# Written by cluster/local/up.sh
[node]
id = $n
data_dir = "$(realpath "$d")/data"

[registry]
listen = "127.0.0.1:500$n"

[cluster]
listen = "127.0.0.1:510$n"
$(for m in "${nodes[@]}"; do printf '\n[[cluster.members]]\nid = %s\npeer = "127.0.0.1:510%s"\nregistry = "127.0.0.1:500%s"\n' "$m" "$m" "$m"; done)

[auth]
mode = "$auth"

[[tunnel.relay]]
address = "127.0.0.1:7000"
ca = "$(realpath "$r")/tls/ca.pem"
token_file = "$(realpath "$r")/token-node$n"
TOML
    if running "$d"; then
        echo "node$n already running (pid $(cat "$d/pid"))"
        continue
    fi
    launch "$d" serve --config "$d/config.toml"
    echo "node$n started (pid $(cat "$d/pid"), registry 127.0.0.1:500$n, peer 127.0.0.1:510$n)"
done

if leader=$(cluster/wait-for-leader.sh 30 http://127.0.0.1:5001 http://127.0.0.1:5002 http://127.0.0.1:5003); then
    echo "cluster up: leader is node $leader"
else
    echo "logs in $dir/node*/log" >&2
    exit 1
fi

# every agent connected: the relay reports all nodes behind the shared service
if cluster/wait-for-agents.sh 30 http://127.0.0.1:7500 "${#nodes[@]}"; then
    echo "relay up: ${#nodes[@]} agents behind 127.0.0.1:6000"
else
    echo "not every agent reached the relay; logs in $dir/relay/log and $dir/node*/log" >&2
    exit 1
fi

if [ "$auth" != none ]; then
    pw="$dir/admin-password"
    if [ ! -f "$pw" ]; then
        (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$pw")
    fi
    if "$bin" user list --json --node 127.0.0.1:5101 | grep -q '"name": "admin"'; then
        echo "user admin exists (password in $pw)"
    else
        "$bin" user add admin --admin --password-file "$pw" --node 127.0.0.1:5101 >/dev/null
        echo "auth $auth: user admin made, password in $pw"
    fi
    echo "  docker login 127.0.0.1:6000 -u admin --password-stdin < $pw"
fi

if $with_backup; then
    d="$dir/node4"
    mkdir -p "$d/data"
    cat > "$d/config.toml" <<TOML
# Written by cluster/local/up.sh --with-backup
[node]
id = 4
data_dir = "$(realpath "$d")/data"
role = "backup"

[registry]
listen = "127.0.0.1:5004"

[cluster]
listen = "127.0.0.1:5104"

[auth]
mode = "$auth"
TOML
    if running "$d"; then
        echo "node4 (backup) already running (pid $(cat "$d/pid"))"
    else
        launch "$d" serve --config "$d/config.toml"
        for _ in $(seq 1 100); do curl -fs -o /dev/null http://127.0.0.1:5004/v2/ 2>/dev/null && break; sleep 0.1; done
        echo "node4 (backup) started (pid $(cat "$d/pid"), registry 127.0.0.1:5004, peer 127.0.0.1:5104)"
    fi
    if "$bin" cluster status --node 127.0.0.1:5101 --json | grep -q '"id": 4'; then
        echo "node4 is already the backup"
    else
        "$bin" cluster add-backup --node 127.0.0.1:5101 --id 4 --peer 127.0.0.1:5104 --registry 127.0.0.1:5004
    fi
fi
