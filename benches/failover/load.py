#!/usr/bin/env python3
"""Push and pull load against a registry endpoint, counting every failed request.

Usage: load.py HOST:PORT SECONDS CLIENTS

Each client (one keep-alive connection, python's http.client, no retries) alternates: push a
small blob (single POST ?digest=) and a manifest tagged t<i> in fo/r<client>, then pull back
an earlier tag's manifest and its blob. Prints the count of good and failed operations (a push: blob then
manifest; a pull: manifest then blob; an operation fails at its first bad request), and the
first 40 failures with the second they happened and the status or error. Used for the leader
kill and rolling restart figures in docs/benchmarks.md, pointed at the relay's shared endpoint
of cluster/local/up.sh (127.0.0.1:6000).
"""
import hashlib, json, sys, threading, http.client, time, os
ep = sys.argv[1]; DUR = float(sys.argv[2]); T = int(sys.argv[3])
host, port = ep.split(":")
lock = threading.Lock(); ok = [0]; errs = []
t0 = time.time()
def worker(k):
    c = http.client.HTTPConnection(host, int(port), timeout=15)
    i = 0
    pushed = []
    while time.time() - t0 < DUR:
        i += 1
        repo = f"fo/r{k}"
        try:
            if i % 2 == 0 or not pushed:
                blob = os.urandom(64) + f"{k}-{i}".encode()
                d = "sha256:" + hashlib.sha256(blob).hexdigest()
                c.request("POST", f"/v2/{repo}/blobs/uploads/?digest={d}", body=blob)
                r = c.getresponse(); body = r.read(); what = "blob"
                if r.status != 201: raise Exception(f"blob {r.status} {body[:200]}")
                m = json.dumps({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                  "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":d,"size":len(blob)},"layers":[]}).encode()
                c.request("PUT", f"/v2/{repo}/manifests/t{i}", body=m, headers={"content-type":"application/vnd.oci.image.manifest.v1+json"})
                r = c.getresponse(); r.read()
                if r.status != 201: raise Exception(f"manifest PUT {r.status}")
                pushed.append(f"t{i}")
            else:
                tag = pushed[i % len(pushed)]
                c.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"accept":"application/vnd.oci.image.manifest.v1+json"})
                r = c.getresponse(); b = r.read()
                if r.status != 200: raise Exception(f"manifest GET {r.status}")
                d = json.loads(b)["config"]["digest"]
                c.request("GET", f"/v2/{repo}/blobs/{d}")
                r = c.getresponse(); r.read()
                if r.status != 200: raise Exception(f"blob GET {r.status}")
            with lock: ok[0] += 1
        except Exception as e:
            with lock: errs.append((round(time.time()-t0,3), str(e)[:300]))
            c.close(); c = http.client.HTTPConnection(host, int(port), timeout=15)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(T)]
for t in ts: t.start()
for t in ts: t.join()
print(f"ok {ok[0]} errors {len(errs)}")
for e in errs[:40]: print(" ", e)
