#!/usr/bin/python3
"""A reader process for the memory and stress tests (numpy only, so its baseline is small).

  reader_worker.py memmap MOUNT        memmap every tensor, touch every page, keep the maps
  reader_worker.py read MOUNT          read() every tensor in 1 MiB chunks
  reader_worker.py random MOUNT SECS SEED THREADS   random ranges via read() and mmap for SECS
  reader_worker.py copy MOUNT DEST     copy /.ckptfs/model.safetensors to DEST as cp would, but
                                       flushing and dropping DEST's pages every 16 MiB so that
                                       the copy's own page cache does not blur the measurement
It prints one JSON line: sha256 of every tensor it read fully, or the random ranges' checks.
Before starting it prints "ready" and waits for a line on stdin, so the caller can take a
baseline of the process first.
"""
import hashlib
import json
import mmap
import os
import random
import sys
import time

import numpy as np


def main():
    mode, mount = sys.argv[1], sys.argv[2]
    with open(os.path.join(mount, ".ckptfs/index.json")) as f:
        tensors = json.load(f)["tensors"]
    print("ready", flush=True)
    sys.stdin.readline()
    result = {}
    if mode == "memmap":
        maps = []
        for e in tensors:
            if e["nbytes"] == 0:
                continue
            mm = np.memmap(os.path.join(mount, e["path"]), dtype=np.uint8, mode="r")
            result[e["path"]] = hashlib.sha256(mm).hexdigest()  # touches every page
            maps.append(mm)  # kept open, as a model loaded by memmap would be
        result["_maps_open"] = len(maps)
    elif mode == "read":
        for e in tensors:
            h = hashlib.sha256()
            with open(os.path.join(mount, e["path"]), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            result[e["path"]] = h.hexdigest()
    elif mode == "copy":
        dest = sys.argv[3]
        h = hashlib.sha256()
        with open(os.path.join(mount, ".ckptfs/model.safetensors"), "rb") as src, open(dest, "wb") as out:
            written = 0
            while chunk := src.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                written += len(chunk)
                if written % (16 << 20) == 0:
                    out.flush()
                    os.fdatasync(out.fileno())
                    os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        result["bytes"] = written
        result["sha256"] = h.hexdigest()
    elif mode == "random":
        import threading
        secs, seed, nthreads = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        files = [t for t in tensors if t["nbytes"] > 0]
        checks = []
        lock = threading.Lock()

        def hammer(thread_seed):
            rng = random.Random(thread_seed)
            mine = []
            deadline = time.monotonic() + secs
            while time.monotonic() < deadline:
                e = rng.choice(files)
                n = e["nbytes"]
                off = rng.randrange(n)
                length = rng.randrange(1, min(n - off, 3 << 20) + 1)
                path = os.path.join(mount, e["path"])
                with open(path, "rb") as f:
                    if rng.random() < 0.5:
                        f.seek(off)
                        data = f.read(length)
                    else:
                        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                            data = m[off:off + length]
                mine.append([e["path"], off, length, hashlib.sha256(data).hexdigest()])
            with lock:
                checks.extend(mine)

        threads = [threading.Thread(target=hammer, args=(seed * 100 + i,)) for i in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["checks"] = checks
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
