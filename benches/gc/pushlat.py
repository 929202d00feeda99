#!/usr/bin/env python3
"""Push latency under whatever else happens: CLIENTS clients each push small images (a blob by a
single POST ?digest=, then a manifest tagged l<i> in bench/live<client>) until the file STOP
exists. Each push is timed and filed under the phase named in the file PHASE when it began
(the caller writes "before", "during", …). Prints, per phase, the pushes and their median and
99th-percentile time in ms, as JSON. Usage: pushlat.py HOST:PORT CLIENTS PHASE STOP
"""
import hashlib, json, os, sys, threading, time, http.client

host, port = sys.argv[1].split(":"); clients = int(sys.argv[2]); phase_file = sys.argv[3]; stop = sys.argv[4]
lock = threading.Lock(); times = {}; errors = []

def phase():
    try: return open(phase_file).read().strip()
    except OSError: return "before"

def worker(k):
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    i = 0
    while not os.path.exists(stop):
        i += 1; p = phase(); t0 = time.monotonic()
        blob = os.urandom(256) + f"{k}-{i}".encode()
        d = "sha256:" + hashlib.sha256(blob).hexdigest()
        try:
            c.request("POST", f"/v2/bench/live{k}/blobs/uploads/?digest={d}", body=blob)
            r = c.getresponse(); r.read()
            if r.status != 201: raise Exception(f"blob {r.status}")
            m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": d, "size": len(blob)},
                "layers": []}).encode()
            c.request("PUT", f"/v2/bench/live{k}/manifests/l{i}", body=m,
                      headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
            r = c.getresponse(); r.read()
            if r.status != 201: raise Exception(f"manifest {r.status}")
        except Exception as e:
            with lock: errors.append(f"{p}: {e}")
            c = http.client.HTTPConnection(host, int(port), timeout=60)
            continue
        with lock: times.setdefault(p, []).append((time.monotonic() - t0) * 1000)

ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
[t.start() for t in ts]; [t.join() for t in ts]
def pct(v, q): v = sorted(v); return round(v[min(len(v) - 1, int(q * len(v)))], 1)
print(json.dumps({p: {"pushes": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99)} for p, v in times.items()}
                 | {"errors": errors[:20], "error_count": len(errors)}))
