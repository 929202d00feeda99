#!/usr/bin/env python3
"""Fills the local cluster (cluster/local/up.sh, nodes 5001-5003) with small images through
the registry API: one blob and one manifest each, tagged t<i> in 200 repositories, spread over
the nodes. Usage: fill.py COUNT [THREADS] [FIRST] (FIRST: the index to start at, to add more).
"""
import hashlib, json, sys, threading, http.client, time
nodes = ["127.0.0.1:5001","127.0.0.1:5002","127.0.0.1:5003"]
N = int(sys.argv[1]); T = int(sys.argv[2]) if len(sys.argv) > 2 else 16
start = int(sys.argv[3]) if len(sys.argv) > 3 else 0
lock = threading.Lock(); done = [0]; errs = [0]
def worker(k):
    conns = {n: http.client.HTTPConnection(n, timeout=30) for n in nodes}
    i = start + k
    while i < start + N:
        n = nodes[i % 3]; c = conns[n]
        blob = f"layer-{i}".encode()
        d = "sha256:" + hashlib.sha256(blob).hexdigest()
        repo = f"scale/r{i % 200}"
        try:
            c.request("POST", f"/v2/{repo}/blobs/uploads/?digest={d}", body=blob)
            r = c.getresponse(); r.read()
            if r.status != 201: raise Exception(f"blob {r.status}")
            m = json.dumps({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":d,"size":len(blob)},
                "layers":[]}).encode()
            c.request("PUT", f"/v2/{repo}/manifests/t{i}", body=m, headers={"content-type":"application/vnd.oci.image.manifest.v1+json"})
            r = c.getresponse(); r.read()
            if r.status != 201: raise Exception(f"manifest {r.status}")
            with lock: done[0] += 1
        except Exception as e:
            with lock: errs[0] += 1
            conns[n] = http.client.HTTPConnection(n, timeout=30)
        i += T
ts = [threading.Thread(target=worker, args=(k,)) for k in range(T)]
t0 = time.time()
for t in ts: t.start()
for t in ts: t.join()
print(f"{done[0]} images, {errs[0]} errors in {time.time()-t0:.1f}s")
