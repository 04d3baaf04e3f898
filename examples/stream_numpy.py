#!/usr/bin/python3
"""Statistics of every tensor in a mounted checkpoint, through numpy.memmap only.

    ckptfs model.ckpt /mnt/model --limit-mb 256
    examples/stream_numpy.py /mnt/model

No torch needed: index.json lists the tensors, each sidecar says which numpy dtype to use.
bfloat16 files hold raw 16-bit words; they are widened to float32 by a 16-bit shift. Memory
stays within the mount's --limit-mb however large the checkpoint is, even though every map
stays open until the end (the daemon drops pages it served when over budget).
"""
import json
import os
import sys

import numpy as np


def as_numbers(mm, dtype):
    if dtype == "bfloat16":
        return (mm.astype("<u4") << 16).view("<f4")
    if dtype in ("complex64", "complex128"):
        return np.abs(mm)
    return mm


def main():
    mount = sys.argv[1]
    with open(os.path.join(mount, ".ckptfs", "index.json")) as f:
        tensors = json.load(f)["tensors"]
    total = 0
    maps = []
    print(f"{'tensor':<48} {'dtype':<10} {'shape':<18} {'mean':>12} {'min':>12} {'max':>12}")
    for t in tensors:
        if t["nbytes"] == 0 or "error" in t:
            continue
        with open(os.path.join(mount, t["sidecar"])) as f:
            side = json.load(f)
        mm = np.memmap(os.path.join(mount, t["path"]), dtype=side["numpy_dtype"], mode="r", shape=tuple(t["shape"]))
        x = as_numbers(mm, t["dtype"]).astype(np.float64)
        print(f"{t['path'][:48]:<48} {t['dtype']:<10} {str(tuple(t['shape'])):<18} "
              f"{x.mean():>12.6g} {x.min():>12.6g} {x.max():>12.6g}")
        total += t["nbytes"]
        maps.append(mm)
    print(f"{len(maps)} tensors, {total} bytes streamed")


if __name__ == "__main__":
    main()
