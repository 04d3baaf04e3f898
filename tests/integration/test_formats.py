"""Formats beyond the default torch zip (issue #4): safetensors written by an independent
writer (this file, following the safetensors spec, with data from numpy and torch), and
hostile safetensors headers."""
import collections
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


class NewerTorchTest(unittest.TestCase):
    """Constructs of torch 2.x, pickled faithfully by newer_torch.py; expected bytes from numpy."""

    def test_newer_constructs(self):
        require_fuse()
        import newer_torch as nt
        rng = np.random.default_rng(4)
        u16 = (np.arange(12, dtype="<u2") * 1000 + 7)
        s0 = nt.Storage("0", nt.UNTYPED, u16.tobytes(), u16.nbytes)
        f8 = rng.integers(0, 256, 32, dtype=np.uint8)
        s1 = nt.Storage("1", nt.UNTYPED, f8.tobytes(), 32)
        p = rng.standard_normal(6).astype("<f4")
        s2 = nt.Storage("2", torch.FloatStorage, p.tobytes(), 6)
        sub = rng.standard_normal(4).astype("<f4")
        s3 = nt.Storage("3", torch.FloatStorage, sub.tobytes(), 4)
        c = (rng.standard_normal(5) + 1j * rng.standard_normal(5)).astype("<c8")
        s4 = nt.Storage("4", torch.ComplexFloatStorage, c.tobytes(), 5)
        x = np.array([1.5, -0.0, 0.0, np.inf, -2.25], dtype="<f4")
        s5 = nt.Storage("5", torch.FloatStorage, x.tobytes(), 5)
        ints = np.arange(4, dtype="<i8")
        s6 = nt.Storage("6", torch.LongStorage, ints.tobytes(), 4)
        idx = np.array([[0, 1, 2], [2, 0, 1]], dtype="<i8")
        s7 = nt.Storage("7", torch.LongStorage, idx.tobytes(), 6)
        vals = np.array([1.0, 2.0, 3.0], dtype="<f4")
        s8 = nt.Storage("8", torch.FloatStorage, vals.tobytes(), 3)
        obj = {
            "u16": nt.v3(s0, 0, (3, 4), (4, 1), "uint16"),
            "u16_t": nt.v3(s0, 0, (4, 3), (1, 4), "uint16"),
            "u32_shared": nt.v3(s0, 1, (3,), (1,), "uint32"),         # a second new dtype on storage 0
            "f8": nt.v3(s1, 1, (2, 4), (8, 2), "float8_e4m3fn"),
            "param": nt.Call("torch._utils._rebuild_parameter_with_state", nt.v2(s2, 0, (2, 3), (3, 1)), True,
                             collections.OrderedDict(), {"_is_sharded": True}),
            "subclass": nt.Call("torch._tensor._rebuild_from_type_v2", nt.Ref("torch._utils._rebuild_tensor_v2"),
                                nt.Ref("mylib.MyTensor"),
                                (s3, 0, (2, 2), (2, 1), False, collections.OrderedDict()), {"tag": "x"}),
            "conj": nt.v2(s4, 0, (5,), (1,), {"conj": True}),
            "neg": nt.v2(s5, 0, (5,), (1,), {"neg": True}),
            "neg_int": nt.v2(s6, 0, (4,), (1,), {"neg": True}),
            "sparse": nt.Call("torch._utils._rebuild_sparse_tensor",
                              nt.Call("torch.serialization._get_layout", "torch.sparse_coo"),
                              (nt.v2(s7, 0, (2, 3), (3, 1)), nt.v2(s8, 0, (3,), (1,)), (3, 3))),
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "newer.pt")
            nt.save(obj, [s0, s1, s2, s3, s4, s5, s6, s7, s8], path)
            want = {
                "u16": u16.tobytes(),
                "u16_t": u16.reshape(3, 4).T.copy().tobytes(),
                "u32_shared": u16.tobytes()[4:16],
                "f8": np.lib.stride_tricks.as_strided(f8[1:], (2, 4), (8, 2)).copy().tobytes(),
                "param": p.tobytes(),
                "subclass": sub.tobytes(),
                "conj": np.conj(c).tobytes(),
                "neg": (-x).tobytes(),
            }
            with Mount(path) as m:
                index = {e["key"][0]: e for e in m.index()["tensors"] if len(e["key"]) == 1}
                for name, raw in want.items():
                    with open(m.file(index[name]["path"]), "rb") as f:
                        self.assertEqual(f.read(), raw, name)
                self.assertEqual(index["u16"]["dtype"], "uint16")
                self.assertEqual(index["u32_shared"]["dtype"], "uint32")
                self.assertEqual(index["f8"]["dtype"], "float8_e4m3fn")
                with open(m.file("param.json")) as f:
                    side = json.load(f)
                self.assertEqual(side["wrapper"], "torch.nn.parameter.Parameter")
                self.assertTrue(side["requires_grad"])
                with open(m.file("subclass.json")) as f:
                    self.assertEqual(json.load(f)["wrapper"], "mylib.MyTensor")
                with open(m.file("conj.json")) as f:
                    self.assertIn("conj", json.load(f)["math_bits"])
                with self.assertRaises(OSError):
                    open(m.file("neg_int"), "rb")
                # Sparse: components are files, the sidecar says what it is.
                with open(m.file("sparse.json")) as f:
                    info = json.load(f)
                self.assertIn("sparse", info["kind"])
                comp = {tuple(e["key"]): e for e in m.index()["tensors"]}
                sparse_keys = [k for k in comp if k[0] == "sparse"]
                self.assertEqual(len(sparse_keys), 2)
                got = sorted(open(m.file(comp[k]["path"]), "rb").read() for k in sparse_keys)
                self.assertEqual(got, sorted([idx.tobytes(), vals.tobytes()]))
            self.assertIn("neg", m.stderr_text)



class DeflatedZipTest(unittest.TestCase):
    """A torch.save zip re-zipped with deflate by Python's zipfile (as some tools do); torch.load
    reads it too, so it is the ground truth for the very same file."""

    def test_deflated_records(self):
        require_fuse()
        import zipfile
        from ckptfs_testlib import torch_bytes, torch_tensors
        with tempfile.TemporaryDirectory() as tmp:
            g = torch.Generator().manual_seed(12)
            big = torch.randn(1024, 768, generator=g)  # 3 MiB: many cache blocks
            src = os.path.join(tmp, "stored.pt")
            torch.save({"big": big, "big_t": big.t(), "small": torch.arange(10), "half": torch.randn(7).half(),
                        "zeros": torch.zeros(256, 256)}, src)
            path = os.path.join(tmp, "deflated.pt")
            rewrite_zip(src, path, lambda name, data: data, compression=zipfile.ZIP_DEFLATED)
            with zipfile.ZipFile(path) as z:
                self.assertTrue(all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist()))
            expected = torch_tensors(torch.load(path))
            with Mount(path, "--limit-mb", "8") as m:
                for e in m.index()["tensors"]:
                    want = torch_bytes(expected[tuple(e["key"])])
                    with open(m.file(e["path"]), "rb") as f:
                        self.assertEqual(f.read(), want, e["path"])
                # Random and backward reads restart the inflater: still the right bytes.
                want = torch_bytes(expected[("big",)])
                import random
                rng = random.Random(1)
                with open(m.file("big"), "rb") as f:
                    for _ in range(30):
                        off = rng.randrange(len(want))
                        f.seek(off)
                        self.assertEqual(f.read(5000), want[off:off + 5000])
                with open(m.file("big.json")) as f:
                    self.assertIn("deflated", json.load(f)["source"]["record"])



class ReorderedZipTest(unittest.TestCase):
    """ckptfs parses the first record as the pickle while it indexes the directory, when that
    record is <prefix>data.pkl and stored (as torch writes it). Archives laid out otherwise must
    load the same: data.pkl last (a stored tensor record first), and data.pkl first but
    deflated. torch.load of each file is the truth."""

    def test_data_pkl_not_first_or_deflated(self):
        require_fuse()
        import zipfile
        from ckptfs_testlib import torch_bytes, torch_tensors
        with tempfile.TemporaryDirectory() as tmp:
            g = torch.Generator().manual_seed(5)
            src = os.path.join(tmp, "torch.pt")
            torch.save({"a": torch.randn(300, 7, generator=g), "b": torch.arange(50).view(5, 10).t(),
                        "c": torch.randn(3, generator=g).double()}, src)
            with zipfile.ZipFile(src) as z:
                names = [i.filename for i in z.infolist()]
                pickle_name = next(n for n in names if n.endswith("/data.pkl"))
                self.assertEqual(names[0], pickle_name)  # what the fast path expects
                pickle = z.read(pickle_name)
            last = os.path.join(tmp, "pkl_last.pt")
            with zipfile.ZipFile(src) as zin, zipfile.ZipFile(last, "w", zipfile.ZIP_STORED) as zout:
                for n in names[1:] + names[:1]:
                    zout.writestr(n, zin.read(n))
            deflated_pkl = os.path.join(tmp, "pkl_deflated.pt")
            with zipfile.ZipFile(src) as zin, zipfile.ZipFile(deflated_pkl, "w", zipfile.ZIP_STORED) as zout:
                for n in names:
                    zout.writestr(n, zin.read(n),
                                  compress_type=zipfile.ZIP_DEFLATED if n == pickle_name else zipfile.ZIP_STORED)
            for path in (last, deflated_pkl):
                with zipfile.ZipFile(path) as z:
                    self.assertEqual(z.read(pickle_name), pickle)
                expected = torch_tensors(torch.load(path))
                with Mount(path, "--limit-mb", "8") as m:
                    tensors = m.index()["tensors"]
                    self.assertEqual(len(tensors), 3, path)
                    for e in tensors:
                        with open(m.file(e["path"]), "rb") as f:
                            self.assertEqual(f.read(), torch_bytes(expected[tuple(e["key"])]), (path, e["path"]))


def write_sparse_zip64(path, prefix, pickle_bytes, big_name, big_size, patches):
    """Writes a torch-style stored zip whose record |big_name| is |big_size| bytes: zeros
    (a hole in a sparse file) except |patches| {offset: bytes}. ZIP64 everywhere it is due:
    sizes >= 4 GiB and local-header offsets >= 4 GiB, plus the ZIP64 end records."""
    import zlib
    entries = []  # (name, offset, size, crc)
    with open(path, "wb") as f:
        def put(name, data_len, writer, crc):
            offset = f.tell()
            z64 = data_len >= 0xFFFFFFFF
            extra = struct.pack("<HHQQ", 1, 16, data_len, data_len) if z64 else b""
            nm = name.encode()
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if z64 else 20, 0, 0, 0, 0, crc,
                                0xFFFFFFFF if z64 else data_len, 0xFFFFFFFF if z64 else data_len, len(nm), len(extra)))
            f.write(nm + extra)
            writer()
            entries.append((nm, offset, data_len, crc))

        put(f"{prefix}/data.pkl", len(pickle_bytes), lambda: f.write(pickle_bytes), zlib.crc32(pickle_bytes))

        def write_big():
            start = f.tell()
            for off, data in sorted(patches.items()):
                f.seek(start + off)
                f.write(data)
            f.seek(start + big_size)
        put(f"{prefix}/{big_name}", big_size, write_big, 0)  # CRC left 0, as with compute_crc32=False
        put(f"{prefix}/version", 2, lambda: f.write(b"3\n"), zlib.crc32(b"3\n"))
        cd_start = f.tell()
        for nm, offset, size, crc in entries:
            fields = []
            if size >= 0xFFFFFFFF:
                fields += [size, size]
            if offset >= 0xFFFFFFFF:
                fields.append(offset)
            extra = struct.pack("<HH", 1, 8 * len(fields)) + struct.pack(f"<{len(fields)}Q", *fields) if fields else b""
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc,
                                0xFFFFFFFF if size >= 0xFFFFFFFF else size, 0xFFFFFFFF if size >= 0xFFFFFFFF else size,
                                len(nm), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if offset >= 0xFFFFFFFF else offset))
            f.write(nm + extra)
        cd_end = f.tell()
        f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries),
                            cd_end - cd_start, cd_start))
        f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


class StorageKeyTest(unittest.TestCase):
    """torch numbers its storage records 0, 1, 2, ... and ckptfs finds those by number; any
    other key is found by its record's name. Either way each tensor gets its own record's bytes,
    as torch.load gives them: "07" beside "7", "00" beside "0", words, a huge number."""

    def test_keys_that_are_not_plain_numbers(self):
        require_fuse()
        import io
        import pickle
        import zipfile

        class Ref:
            def __init__(self, key):
                self.key = key

        class Rebuild:
            def __init__(self, key):
                self.key = key

            def __reduce__(self):
                return (torch._utils._rebuild_tensor_v2,
                        (Ref(self.key), 0, (4,), (1,), False, collections.OrderedDict()))

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", torch.FloatStorage, obj.key, "cpu", 4) if isinstance(obj, Ref) else None

        keys = ["7", "07", "0", "00", "1", "word", "123456789012", "3"]
        with tempfile.TemporaryDirectory(prefix="ckptfs-keys-") as tmp:
            path = os.path.join(tmp, "keys.pt")
            buf = io.BytesIO()
            Pickler(buf, protocol=2).dump({f"t{k}": Rebuild(k) for k in keys})
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
                z.writestr("archive/data.pkl", buf.getvalue())
                for i, k in enumerate(keys):
                    z.writestr(f"archive/data/{k}", (torch.arange(4, dtype=torch.float32) + 10 * i).numpy().tobytes())
                z.writestr("archive/version", "3\n")
            truth = torch.load(path)
            self.assertEqual(len({truth[f"t{k}"][0].item() for k in keys}), len(keys))
            with Mount(path) as m:
                for k in keys:
                    with open(m.file(f"t{k}"), "rb") as f:
                        self.assertEqual(f.read(), truth[f"t{k}"].numpy().tobytes(), k)


class Zip64Test(unittest.TestCase):
    def test_storage_over_4_gib(self):
        require_fuse()
        import newer_torch as nt
        numel = (5 << 30) // 4  # a 5 GiB float32 storage
        nbytes = numel * 4
        head = np.arange(1024, dtype="<f4").tobytes()
        across = np.arange(5000, 6024, dtype="<f4").tobytes()  # straddles byte 4 GiB
        across_at = (1 << 32) - 2048
        tail = np.arange(-1024, 0, dtype="<f4").tobytes()
        storage = nt.Storage("0", torch.FloatStorage, None, numel)
        obj = {"huge": nt.v2(storage, 0, (numel,), (1,)),
               "tail": nt.v2(storage, numel - 1024, (1024,), (1,)),            # element offset > 2^30
               "cross": nt.v2(storage, across_at // 4, (32, 32), (32, 1))}    # bytes around 4 GiB
        import io
        buf = io.BytesIO()
        obj = nt._resolve_refs(obj)
        with nt.installed():
            nt._Pickler(buf, protocol=2).dump(obj)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "huge.pt")
            write_sparse_zip64(path, "huge", buf.getvalue(), "data/0", nbytes,
                               {0: head, across_at: across, nbytes - len(tail): tail})
            self.assertGreater(os.path.getsize(path), 5 << 30)
            with Mount(path, "--limit-mb", "64") as m:
                self.assertEqual(os.stat(m.file("huge")).st_size, nbytes)
                with open(m.file("huge"), "rb") as f:
                    self.assertEqual(f.read(len(head)), head)
                    f.seek(across_at)
                    self.assertEqual(f.read(len(across)), across)
                    f.seek(nbytes - len(tail))
                    self.assertEqual(f.read(), tail)
                    f.seek(3 << 30)
                    self.assertEqual(f.read(4096), bytes(4096))
                with open(m.file("tail"), "rb") as f:
                    self.assertEqual(f.read(), tail)
                with open(m.file("cross"), "rb") as f:
                    self.assertEqual(f.read(), across)


if __name__ == "__main__":
    unittest.main()
