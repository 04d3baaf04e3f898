"""The safetensors view and `ckptfs convert` (issue #7): /.ckptfs/model.safetensors and the
converted file are parsed by an independent reader (this file: Python's json for the header,
numpy for the data, following the safetensors spec) and must equal torch.load's tensors byte for
byte, for every dtype safetensors and this torch share; what safetensors cannot hold is listed
as skipped."""
import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import BINARY, Mount, require_fuse, run_ckptfs, torch_bytes, torch_tensors  # noqa: E402

# safetensors dtype -> (numpy dtype to read it with, torch dtype name)
ST_DTYPES = {
    "F64": ("<f8", "float64"), "F32": ("<f4", "float32"), "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"), "I64": ("<i8", "int64"), "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"), "I8": ("i1", "int8"), "U8": ("u1", "uint8"), "BOOL": ("?", "bool"),
    "C64": ("<c8", "complex64"),
}


def read_safetensors(path):
    """An independent reader: returns ({name: (dtype, shape, raw bytes)}, metadata) after
    checking what the spec requires (header JSON, offsets that tile the data with no holes)."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    assert (8 + n) % 8 == 0, "the data section should start 8-byte aligned"
    meta = header.pop("__metadata__", {})
    assert all(isinstance(v, str) for v in meta.values()), "__metadata__ values must be strings"
    out = {}
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, stop = info["data_offsets"]
        assert begin == end, f"{name}: a hole or an overlap at {begin} (previous tensor ended at {end})"
        npdt, _ = ST_DTYPES[info["dtype"]]
        count = int(np.prod(info["shape"], dtype=np.int64))
        assert stop - begin == count * np.dtype(npdt).itemsize, f"{name}: size does not match its shape"
        assert begin % np.dtype(npdt).itemsize == 0, f"{name}: not aligned to its element size"
        if (stop - begin) % 8 == 0:
            assert begin % 8 == 0, f"{name}: its size allows 8-byte alignment, but it starts at {begin}"
        arr = np.frombuffer(data, dtype=npdt, count=count, offset=begin).reshape(info["shape"])
        out[name] = (info["dtype"], list(info["shape"]), arr.tobytes())
        end = stop
    assert end == len(data), "the data section has bytes no tensor covers"
    return out, meta


def dotted(path):
    return ".".join(str(p) for p in path)


class SafetensorsViewTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_fuse()
        cls.tmp = tempfile.TemporaryDirectory(prefix="ckptfs-convert-")
        g = torch.Generator().manual_seed(9)
        base = torch.randn(6, 8, generator=g)
        tensors = {name: torch.randn(5, 3, generator=g).to(getattr(torch, name))
                   for name in ("float64", "float32", "float16", "bfloat16", "complex64")}
        for name in ("int64", "int32", "int16", "int8", "uint8"):
            tensors[name] = torch.randint(-100 if name != "uint8" else 0, 100, (7,), dtype=getattr(torch, name), generator=g)
        tensors["bool"] = torch.randn(3, 3, generator=g) > 0
        tensors["scalar"] = torch.tensor(1.5)
        tensors["empty"] = torch.zeros(0, 4)
        tensors["transposed"] = base.t()          # a view: served contiguous
        tensors["sliced"] = base[1:5:2, 3:]
        tensors["complex128"] = torch.randn(2, dtype=torch.complex128, generator=g)  # no safetensors dtype
        tensors["quantized"] = torch.quantize_per_tensor(torch.randn(4, generator=g), 0.1, 0, torch.qint8)
        cls.flat = os.path.join(cls.tmp.name, "flat.pt")
        torch.save(tensors, cls.flat)
        cls.nested = os.path.join(cls.tmp.name, "nested.pt")
        torch.save({"state_dict": {"layer.0.weight": base, "layer.0.bias": base[0]},
                    "optimizer": {"state": {0: {"exp_avg": base * 2}}}, "epoch": 3}, cls.nested)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def expected(self, path, root=()):
        found = torch_tensors(torch.load(path))
        return {dotted(k[len(root):]): torch_bytes(t) for k, t in found.items()
                if k[:len(root)] == root and not t.is_quantized}

    def check(self, st_path, want, skipped=()):
        got, meta = read_safetensors(st_path)
        self.assertEqual(meta.get("format"), "pt")
        want = {k: v for k, v in want.items() if k not in skipped}
        self.assertEqual(sorted(got), sorted(want))
        for key, (_, _, raw) in got.items():
            self.assertEqual(raw, want[key], key)
        listed = json.loads(meta.get("skipped", "[]"))
        for s in skipped:
            self.assertTrue(any(entry.startswith(s) or f"'{s}'" in entry for entry in listed), (s, listed))
        return got, meta

    def test_virtual_file_equals_torch_for_every_dtype(self):
        with Mount(self.flat) as m:
            st = m.file(".ckptfs/model.safetensors")
            got, _ = self.check(st, self.expected(self.flat), skipped=("complex128", "quantized"))
            dtype_names = {torch_name for _, torch_name in ST_DTYPES.values()}
            for key, (dt, _, _) in got.items():
                if key in dtype_names:  # the tensors named after their dtype
                    self.assertEqual(ST_DTYPES[dt][1], key)
            self.assertEqual(got["transposed"][1], [8, 6])
            # Like the .npy views, the virtual file adds no blocks: du counts tensors once.
            self.assertEqual(os.stat(st).st_blocks, 0)
            # Random windows equal the same range of the whole file.
            with open(st, "rb") as f:
                whole = f.read()
            fd = os.open(st, os.O_RDONLY)
            try:
                for off, n in [(0, 7), (5, 300), (len(whole) - 3, 3), (len(whole) // 2, 4096)]:
                    self.assertEqual(os.pread(fd, n, off), whole[off:off + n])
            finally:
                os.close(fd)

    def test_keys_are_dotted_paths_and_root_gives_plain_keys(self):
        with Mount(self.nested) as m:
            got, _ = self.check(m.file(".ckptfs/model.safetensors"), self.expected(self.nested))
            self.assertIn("state_dict.layer.0.weight", got)
            self.assertIn("optimizer.state.0.exp_avg", got)
        with Mount(self.nested, "--root", "state_dict") as m:
            got, _ = self.check(m.file(".ckptfs/model.safetensors"),
                                self.expected(self.nested, root=("state_dict",)))
            self.assertEqual(sorted(got), ["layer.0.bias", "layer.0.weight"])

    def test_convert_command_writes_the_same_file(self):
        out = os.path.join(self.tmp.name, "flat.safetensors")
        r = run_ckptfs("convert", "--limit-mb", "8", self.flat, out)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("skipped", r.stdout)
        self.assertIn("complex128", r.stderr)
        self.check(out, self.expected(self.flat), skipped=("complex128", "quantized"))
        with Mount(self.flat) as m, open(m.file(".ckptfs/model.safetensors"), "rb") as f, open(out, "rb") as g:
            self.assertEqual(f.read(), g.read())
        # The converted file mounts too, and serves the same bytes.
        with Mount(out) as m:
            for key, want in self.expected(self.flat).items():
                if key in ("complex128",):
                    continue
                with open(m.file(key), "rb") as f:
                    self.assertEqual(f.read(), want, key)

    def test_convert_errors_are_one_line_and_leave_nothing(self):
        out = os.path.join(self.tmp.name, "never.safetensors")
        bad = os.path.join(self.tmp.name, "garbage.pt")
        with open(bad, "wb") as f:
            f.write(b"not a checkpoint at all")
        for args in ([bad, out], ["--root", "nope", self.nested, out], [self.flat, "/nonexistent/dir/x.safetensors"]):
            r = run_ckptfs("convert", *args)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertTrue(r.stderr.startswith("ckptfs convert: "), r.stderr)
            self.assertFalse(os.path.exists(out))
            self.assertFalse(os.path.exists(out + ".ckptfs-partial"))
        r = run_ckptfs("convert", self.flat)
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage", r.stderr)

    def test_progress_bar_on_a_terminal(self):
        out = os.path.join(self.tmp.name, "tty.safetensors")
        # script(1) gives the command a terminal; the bar ends at 100%.
        r = subprocess.run(["script", "-qec", f"{BINARY} convert {self.flat} {out}", "/dev/null"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("100%", r.stdout)


if __name__ == "__main__":
    unittest.main()
