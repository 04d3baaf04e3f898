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


def rewrite_zip(src, dst, transform, add=None, compression=None):
    """Copies a torch zip record by record; transform(name, data) -> new data (or None: drop);
    |add| maps record names (below the prefix) to extra records."""
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.infolist()[0].filename.split("/")[0]
        for info in zin.infolist():
            data = transform(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data, compress_type=compression)
        for name, data in (add or {}).items():
            zout.writestr(f"{prefix}/{name}", data)


class BigEndianTest(unittest.TestCase):
    """torch 1.13 cannot write big-endian files, so one is constructed: a real torch.save zip
    whose storage records are byte-swapped per element (per half for complex) and whose
    byteorder record says "big", which is what a big-endian host's torch.save writes."""

    def test_served_little_endian(self):
        require_fuse()
        with tempfile.TemporaryDirectory() as tmp:
            g = torch.Generator().manual_seed(9)
            a = torch.randn(3, 4, generator=g)
            tensors = {  # each its own storage, keys 0..5 in this order
                "f32": a, "f64": torch.randn(5, dtype=torch.float64, generator=g),
                "i16": torch.arange(-4, 4, dtype=torch.int16), "c64": torch.randn(3, dtype=torch.complex64, generator=g),
                "bf16": torch.randn(6, generator=g).to(torch.bfloat16), "u8": torch.arange(7, dtype=torch.uint8),
                "f32_t": a.t(),  # a view of storage 0
            }
            swap_unit = {"0": 4, "1": 8, "2": 2, "3": 4, "4": 2, "5": 1}
            little = os.path.join(tmp, "little.pt")
            torch.save(tensors, little)
            big = os.path.join(tmp, "big.pt")

            def to_big(name, data):
                parts = name.split("/")
                if len(parts) == 3 and parts[1] == "data":
                    u = swap_unit[parts[2]]
                    return b"".join(data[i:i + u][::-1] for i in range(0, len(data), u))
                return data
            rewrite_zip(little, big, to_big, add={"byteorder": b"big"})  # torch 1.13 writes none
            with Mount(big) as m:
                for name, t in tensors.items():
                    with open(m.file(name), "rb") as f:
                        got = f.read()
                    want = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    self.assertEqual(got, want, name)
                with open(m.file("f32.json")) as f:
                    self.assertIn("big-endian", json.load(f)["byteswapped"])
                # Partial reads inside elements still swap whole elements.
                with open(m.file("f64"), "rb") as f:
                    f.seek(3)
                    want = tensors["f64"].numpy().tobytes()
                    self.assertEqual(f.read(13), want[3:16])


if __name__ == "__main__":
    unittest.main()
