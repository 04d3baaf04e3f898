#!/usr/bin/python3
"""Writes seed corpora for the libFuzzer targets from the integration-test generators.

usage: make_seeds.py OUTDIR   (creates OUTDIR/{pickle,checkpoint,names})

Seeds are real torch.save output (zip and legacy), safetensors files from the test suite's
independent writer, the data.pkl pickles inside the zips, and the checkpoints' key names. Cases
larger than 64 KiB are left out: the fuzzer mutates small inputs best.
"""
import io
import os
import pickle
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gen_checkpoints  # noqa: E402
from test_formats import write_safetensors  # noqa: E402

MAX_SEED = 64 << 10


def keys_of(obj, out, depth=0):
    if depth > 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(str(k))
            keys_of(v, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            keys_of(v, out, depth + 1)


def main():
    outdir = sys.argv[1]
    dirs = {d: os.path.join(outdir, d) for d in ("pickle", "checkpoint", "names")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    names = set()
    count = 0
    for case, (make, kwargs) in gen_checkpoints.CASES.items():
        obj = make()
        keys_of(obj, names)
        for flavour, extra in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
            buf = io.BytesIO()
            torch.save(obj, buf, **{**kwargs, **extra})
            data = buf.getvalue()
            if len(data) > MAX_SEED:
                continue
            with open(os.path.join(dirs["checkpoint"], f"{case}.{flavour}"), "wb") as f:
                f.write(data)
            count += 1
            if data[:2] == b"PK":
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                    with open(os.path.join(dirs["pickle"], case), "wb") as f:
                        f.write(z.read(pkl))
    # Plain Python pickles of every protocol: opcodes torch.save does not emit.
    plain = {"a": [1, 2.5, None, True, "x" * 300, b"\x00\xff", (1,), {3, 4}, 2**70, -2**64]}
    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        with open(os.path.join(dirs["pickle"], f"plain.p{proto}"), "wb") as f:
            f.write(pickle.dumps(plain, protocol=proto))
    rng = np.random.default_rng(5)
    arrays = {
        "w": ("F32", (3, 4), rng.standard_normal((3, 4)).astype("<f4").tobytes()),
        "b": ("BF16", (2,), b"\x80\x3f\x00\x40"),
        "i": ("I64", (2, 1), np.arange(2, dtype="<i8").tobytes()),
        "e": ("F16", (0,), b""),
    }
    write_safetensors(os.path.join(dirs["checkpoint"], "plain.safetensors"), arrays,
                      metadata={"format": "pt"})
    for i, n in enumerate(sorted(names)[:300] + ["", ".", "..", "a/b", "%2F", "x" * 400, "é" * 120]):
        with open(os.path.join(dirs["names"], f"name{i}"), "wb") as f:
            f.write((n + n[::-1]).encode("utf-8", "surrogatepass"))
    print(f"seeds: {count} checkpoints, {len(os.listdir(dirs['pickle']))} pickles, "
          f"{len(os.listdir(dirs['names']))} names in {outdir}")


if __name__ == "__main__":
    main()
