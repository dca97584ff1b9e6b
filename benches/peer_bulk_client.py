"""The peer of the extract benchmark: a Bulk Data client as teams write it
by hand today (Python, httpx): kick-off, poll, then each file downloaded in
turn and written to disk. Prints one JSON line with its timings.

Usage: peer_bulk_client.py BASE_URL TOKEN OUT_DIR
"""
import json
import pathlib
import sys
import time

import httpx

base, token, out = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
auth = {"Authorization": f"Bearer {token}"}
start = time.monotonic()
with httpx.Client(timeout=300) as c:
    r = c.get(f"{base}/$export", headers={**auth, "Prefer": "respond-async", "Accept": "application/fhir+json"})
    r.raise_for_status()
    status = r.headers["content-location"]
    while True:
        r = c.get(status, headers=auth)
        if r.status_code == 200:
            manifest = r.json()
            break
        r.raise_for_status()
        time.sleep(int(r.headers.get("retry-after", "1")))
    prepared = time.monotonic()
    resources = size = 0
    for f in manifest["output"]:
        with c.stream("GET", f["url"], headers=auth) as r, open(out / f"{f['type']}.ndjson", "wb") as w:
            r.raise_for_status()
            for chunk in r.iter_bytes():
                w.write(chunk)
                size += len(chunk)
                resources += chunk.count(b"\n")
end = time.monotonic()
print(json.dumps({"export_wait_seconds": prepared - start, "download_seconds": end - prepared,
                  "seconds": end - start, "resources": resources, "bytes": size}))
