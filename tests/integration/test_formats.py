"""Formats beyond the default torch zip (issue #4): safetensors written by an independent
writer (this file, following the safetensors spec, with data from numpy and torch), and
hostile safetensors headers."""
import json
import os
import struct
import sys
import tempfile
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import Mount, is_mounted, require_fuse, run_ckptfs  # noqa: E402


def write_safetensors(path, tensors, metadata=None, pad_to=8):
    """tensors: {name: (st_dtype, shape, raw bytes)}. Data in the given order, header padded
    with spaces to |pad_to| like the Rust writer (pad_to=1: no padding, like old writers)."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % pad_to)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, (_, _, raw) in tensors.items():
            f.write(raw)


class SafetensorsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_fuse()
        cls.tmp = tempfile.TemporaryDirectory(prefix="ckptfs-st-")
        rng = np.random.default_rng(3)
        cls.arrays = {
            "f32": ("F32", rng.standard_normal((3, 5)).astype("<f4")),
            "f64": ("F64", rng.standard_normal(4).astype("<f8")),
            "f16": ("F16", rng.standard_normal((2, 2)).astype("<f2")),
            "i8": ("I8", rng.integers(-128, 127, 7).astype("i1")),
            "u8": ("U8", rng.integers(0, 255, 7).astype("u1")),
            "i16": ("I16", rng.integers(-3000, 3000, 5).astype("<i2")),
            "u16": ("U16", rng.integers(0, 65535, 5).astype("<u2")),
            "i32": ("I32", rng.integers(-2**31, 2**31 - 1, 5).astype("<i4")),
            "u32": ("U32", rng.integers(0, 2**32 - 1, 5, dtype=np.uint64).astype("<u4")),
            "i64": ("I64", rng.integers(-2**62, 2**62, 5).astype("<i8")),
            "u64": ("U64", rng.integers(0, 2**63, 5, dtype=np.uint64).astype("<u8")),
            "bool": ("BOOL", rng.integers(0, 2, 9).astype("?")),
            "scalar": ("F32", np.array(2.5, dtype="<f4")),
            "empty": ("F32", np.zeros((0, 4), dtype="<f4")),
            "model.layers.0/attn": ("F32", rng.standard_normal(6).astype("<f4")),
        }
        bf = torch.randn(4, 3).to(torch.bfloat16)
        cls.bf16_raw = bf.view(torch.int16).numpy().tobytes()
        tensors = {k: (dt, a.shape, a.tobytes()) for k, (dt, a) in cls.arrays.items()}
        tensors["bf16"] = ("BF16", (4, 3), cls.bf16_raw)
        cls.path = os.path.join(cls.tmp.name, "model.safetensors")
        write_safetensors(cls.path, tensors, metadata={"format": "pt", "note": "ckptfs test"}, pad_to=1)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_every_dtype_byte_exact(self):
        with Mount(self.path) as m:
            index = {tuple(e["key"]): e for e in m.index()["tensors"]}
            self.assertEqual(m.index()["format"], "safetensors")
            for name, (dt, arr) in self.arrays.items():
                e = index[(name,)]
                with open(m.file(e["path"]), "rb") as f:
                    self.assertEqual(f.read(), arr.tobytes(), name)
                self.assertEqual(e["shape"], list(arr.shape), name)
            e = index[("bf16",)]
            self.assertEqual(e["dtype"], "bfloat16")
            with open(m.file(e["path"]), "rb") as f:
                self.assertEqual(f.read(), self.bf16_raw)
            self.assertEqual(index[("model.layers.0/attn",)]["path"], "model.layers.0%2Fattn")
            with open(m.file("__metadata__/format.json")) as f:
                self.assertEqual(json.load(f), "pt")
            with open(m.file("u16.json")) as f:
                side = json.load(f)
            self.assertEqual((side["dtype"], side["numpy_dtype"]), ("uint16", "<u2"))

    def hostile(self, name, header_bytes, data=b"", contains=""):
        path = os.path.join(self.tmp.name, name)
        with open(path, "wb") as f:
            f.write(header_bytes + data)
        mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
        try:
            r = run_ckptfs(path, mnt)
            self.assertNotEqual(r.returncode, 0)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn(contains, r.stderr)
            self.assertFalse(is_mounted(mnt))
        finally:
            os.rmdir(mnt)

    def test_hostile_headers(self):
        def hdr(obj):
            text = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
            return struct.pack("<Q", len(text)) + text
        self.hostile("outside.safetensors", hdr({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}),
                     b"\0" * 16, "outside")
        self.hostile("size.safetensors", hdr({"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}),
                     b"\0" * 16, "size")
        self.hostile("overflow.safetensors", hdr({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}),
                     b"\0" * 16, "size")
        self.hostile("badjson.safetensors", hdr(b'{"w": {"dtype": '), b"", "JSON")
        self.hostile("nofields.safetensors", hdr({"w": {"shape": [1]}}), b"", "lacks")
        self.hostile("neg.safetensors", hdr({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), b"\0" * 4,
                     "shape")


if __name__ == "__main__":
    unittest.main()
