"""Mounts checkpoints written by the real torch.save and compares every tensor file
byte-for-byte with what torch.load gives (issue #2)."""
import errno
import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
import unittest
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_checkpoints  # noqa: E402
from ckptfs_testlib import (Mount, dtype_name, unmount, reclaim_counters, reclaim_ran_since,  # noqa: E402
                            require_fuse, resident_pages, torch_bytes, torch_tensors)

def memmap_bytes(path):
    """The bytes of |path| as numpy.memmap of it reads them (page faults, not read())."""
    with open(path, "rb") as f:
        mm = np.memmap(f, dtype="u1", mode="r")
        data = mm.tobytes()
        del mm
    return data


NUMPY_OF = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "bfloat16": "<u2", "int8": "|i1",
            "int16": "<i2", "int32": "<i4", "int64": "<i8", "uint8": "|u1", "bool": "|b1",
            "complex64": "<c8", "complex128": "<c16"}


def nodeids_read(log):
    """The inodes that the READ requests of a -d log asked for."""
    return {int(line.split("nodeid: ")[1].split(",")[0]) for line in log.splitlines() if "opcode: READ " in line}


class MountedCheckpointTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_fuse()
        cls.tmp = tempfile.TemporaryDirectory(prefix="ckptfs-gen-")
        cls.paths = {name: gen_checkpoints.write(cls.tmp.name, name) for name in gen_checkpoints.CASES}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def check_byte_exact(self, name):
        """Every tensor torch.load finds is a file with exactly its bytes, and nothing more."""
        path = self.paths[name]
        expected = torch_tensors(torch.load(path, weights_only=False))
        with Mount(path) as m:
            index = m.index()
            entries = {tuple(e["key"]): e for e in index["tensors"]}
            self.assertEqual(set(entries), set(expected), f"{name}: tensor key paths differ from torch.load")
            for key, t in expected.items():
                e = entries[key]
                want = torch_bytes(t)
                with open(m.file(e["path"]), "rb") as f:
                    got = f.read()
                self.assertEqual(len(got), len(want), f"{name}:{key} size")
                self.assertTrue(got == want, f"{name}:{key}: bytes differ from torch.load")
                self.assertEqual(os.stat(m.file(e["path"])).st_size, len(want))
                self.assertEqual(e["dtype"], dtype_name(t))
                self.assertEqual(e["shape"], list(t.shape))
                self.assertEqual(e["nbytes"], len(want))
                with open(m.file(e["sidecar"])) as f:
                    side = json.load(f)
                self.assertEqual(side["dtype"], dtype_name(t))
                self.assertEqual(side["numpy_dtype"], NUMPY_OF[dtype_name(t)])
                self.assertEqual(side["shape"], list(t.shape))
                self.assertEqual(side["nbytes"], len(want))
                self.assertEqual([k for k in side["key"]], list(key))
        self.assertNotIn("error", m.stderr_text.lower(), m.stderr_text)
        return expected

    def test_every_dtype(self):
        found = self.check_byte_exact("dtypes")
        self.assertEqual({dtype_name(t) for t in found.values()}, set(NUMPY_OF))

    def test_views_strides_offsets_sharing(self):
        self.check_byte_exact("views")

    def test_lightning_style_nested(self):
        self.check_byte_exact("lightning")

    def test_pickled_module(self):
        found = self.check_byte_exact("module")
        self.assertIn(("_modules", "conv", "_parameters", "weight"), found)

    def test_many_small_tensors(self):
        found = self.check_byte_exact("many")
        self.assertEqual(len(found), 5000)

    def test_awkward_names(self):
        self.check_byte_exact("names")

    def test_protocol4_and_parameters(self):
        self.check_byte_exact("protocol4")
        self.check_byte_exact("parameters")

    def test_rebuild_tensor_v1(self):
        found = self.check_byte_exact("rebuild_v1")
        self.assertEqual(len(found), 4)

    def test_legacy_format(self):
        self.check_byte_exact("legacy_views")
        self.check_byte_exact("legacy_lightning")
        self.check_byte_exact("legacy_module")
        self.check_byte_exact("legacy_protocol4")
        with Mount(self.paths["legacy_views"]) as m:
            self.assertEqual(m.index()["format"], "torch legacy")

    def test_readable_values(self):
        """numpy scalars/arrays, torch.Size/device/dtype and dict subclasses read as values."""
        self.check_byte_exact("values")
        obj = torch.load(self.paths["values"])
        with Mount(self.paths["values"]) as m:
            def value(rel):
                with open(m.file(rel)) as f:
                    return json.load(f)
            for k in ("np_f64", "np_f32", "np_f16"):
                self.assertEqual(value(k + ".json"), float(obj[k]), k)
            for k in ("np_i64", "np_u8"):
                self.assertEqual(value(k + ".json"), int(obj[k]), k)
            self.assertIs(value("np_bool.json"), True)
            self.assertEqual(value("np_c64.json"), {"real": obj["np_c64"].real, "imag": obj["np_c64"].imag})
            for k in ("np_array", "np_fortran", "np_big_endian"):
                arr = value(k + ".json")["__ndarray__"]
                self.assertEqual(arr["values"], obj[k].tolist(), k)
                self.assertEqual(arr["shape"], list(obj[k].shape), k)
                self.assertEqual(arr["dtype"], obj[k].dtype.str, k)
            self.assertEqual(value("size.json"), list(obj["size"]))
            self.assertEqual(value("device.json"), str(obj["device"]))
            self.assertEqual(value("dtype.json"), str(obj["dtype"]))
            self.assertEqual(value("hparams/lr.json"), 0.1)
            self.assertTrue(os.path.exists(m.file("hparams/w")))

    def test_npy_views(self):
        """X.npy is X behind an NPY header: np.load(mmap_mode='r') gives dtype and shape."""
        for case in ("views", "dtypes"):
            expected = torch_tensors(torch.load(self.paths[case]))
            with Mount(self.paths[case]) as m:
                for e in m.index()["tensors"]:
                    t = expected[tuple(e["key"])]
                    arr = np.load(m.file(e["npy"]), mmap_mode="r" if t.numel() else None)
                    self.assertEqual(arr.shape, tuple(t.shape), e["path"])
                    self.assertEqual(arr.dtype.str, NUMPY_OF[e["dtype"]], e["path"])
                    self.assertEqual(np.ascontiguousarray(arr).tobytes(), torch_bytes(t), e["path"])
                    del arr
                    # The view adds no blocks: du counts the tensor once.
                    self.assertEqual(os.stat(m.file(e["npy"])).st_blocks, 0)

    def test_sidecar_file_offset_is_where_the_data_starts(self):
        """file_offset comes from the record's local header, read when first needed: its sidecar
        is stat-ed before that (the size must not change), then it must name the byte where
        zipfile says the record's data starts, holding the tensor's bytes."""
        import struct
        path = self.paths["lightning"]
        expected = torch_tensors(torch.load(path, weights_only=False))
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            starts = {}
            for info in z.infolist():
                raw.seek(info.header_offset)
                header = raw.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                starts[info.filename] = info.header_offset + 30 + name_len + extra_len
            with Mount(path) as m:
                entries = m.index()["tensors"]
                sizes = {e["sidecar"]: os.stat(m.file(e["sidecar"])).st_size for e in entries}
                for e in entries:
                    with open(m.file(e["sidecar"]), "rb") as f:
                        text = f.read()
                    self.assertEqual(len(text), sizes[e["sidecar"]], e["sidecar"])
                    source = json.loads(text)["source"]
                    self.assertEqual(source["file_offset"], starts[source["record"]], e["path"])
                    t = expected[tuple(e["key"])]
                    if t.is_contiguous():
                        raw.seek(source["file_offset"] + source["storage_offset"] * t.element_size())
                        self.assertEqual(raw.read(len(torch_bytes(t))), torch_bytes(t), e["path"])

    def test_xattrs(self):
        with Mount(self.paths["lightning"]) as m:
            f = m.file("optimizer_states/0/state/0/exp_avg")
            names = set(os.listxattr(f))
            self.assertLessEqual({"user.ckptfs.dtype", "user.ckptfs.shape", "user.ckptfs.key",
                                  "user.ckptfs.numpy_dtype", "user.ckptfs.nbytes"}, names)
            self.assertEqual(os.getxattr(f, "user.ckptfs.dtype"), b"float32")
            self.assertEqual(json.loads(os.getxattr(f, "user.ckptfs.key")), ["optimizer_states", 0, "state", 0, "exp_avg"])
            self.assertEqual(json.loads(os.getxattr(f, "user.ckptfs.shape")), [16, 8])
            self.assertEqual(os.getxattr(f + ".npy", "user.ckptfs.dtype"), b"float32")
            # The storage's record is an entry of the zip, named after the storage key.
            record = os.getxattr(f, "user.ckptfs.record").decode()
            storage = os.getxattr(f, "user.ckptfs.storage").decode()
            with zipfile.ZipFile(self.paths["lightning"]) as z:
                self.assertIn(record, z.namelist())
            self.assertTrue(record.endswith("/data/" + storage), record)
            with open(f + ".json") as side:
                source = json.load(side)["source"]
            self.assertEqual((source["record"], source["storage"], source["location"]), (record, storage, "cpu"))
            with self.assertRaises(OSError) as cm:
                os.getxattr(f, "user.ckptfs.nope")
            self.assertEqual(cm.exception.errno, errno.ENODATA)
            self.assertEqual(os.listxattr(m.file("epoch.json")), [])
            # No security labels or POSIX ACLs: "not supported", the answer ls -l remembers.
            for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
                with self.assertRaises(OSError) as cm:
                    os.getxattr(f, name)
                self.assertEqual(cm.exception.errno, errno.EOPNOTSUPP, name)
        # --no-xattrs: the kernel is told once (ENOSYS) and stops asking; the data is the same.
        with Mount(self.paths["lightning"], "--no-xattrs") as m:
            f = m.file("optimizer_states/0/state/0/exp_avg")
            for _ in range(2):
                with self.assertRaises(OSError) as cm:
                    os.getxattr(f, "user.ckptfs.dtype")
                self.assertEqual(cm.exception.errno, errno.EOPNOTSUPP)
            with open(f, "rb") as fh:
                self.assertEqual(len(fh.read()), 16 * 8 * 4)

    def test_ls_l_needs_no_request_per_file(self):
        """ls -l of a directory of many tensors costs no daemon round trip per file (the -d log
        shows every request the daemon got): attributes come with the listing (READDIRPLUS,
        not a LOOKUP per name), and the security label and ACL that ls asks each file for are
        answered "not supported" once, which ls remembers for the whole mount."""
        with Mount(self.paths["many"], "-d") as m:
            files = len([n for n in os.listdir(m.path) if not n.startswith(".")])  # ls hides .ckptfs
            self.assertGreater(files, 300)
            out = subprocess.run(["ls", "-l", m.path], capture_output=True, text=True, check=True)
            self.assertEqual(len(out.stdout.splitlines()), files + 1)  # "total" + one per file
        asked = m.stderr_text.count("opcode: GETXATTR")
        self.assertGreater(asked, 0, "ls -l asked nothing: the test no longer measures anything")
        self.assertLessEqual(asked, 4, f"{asked} GETXATTR requests for ls -l of {files} files")
        self.assertGreater(m.stderr_text.count("opcode: READDIRPLUS"), 10)
        looked_up = m.stderr_text.count("opcode: LOOKUP")
        self.assertLessEqual(looked_up, 4, f"{looked_up} LOOKUP requests for ls -l of {files} files")

    def test_open_and_close_need_no_request(self):
        """When no tensor must fail at open, the kernel opens files itself: the first OPEN is
        answered "not implemented" (NO_OPEN_SUPPORT), so no OPEN or RELEASE follows, and a
        second pass over cached files costs no round trip at all. The bytes stay exact."""
        path = self.paths["many"]
        expected = torch_tensors(torch.load(path, weights_only=False))
        with Mount(path, "-d") as m:
            entries = m.index()["tensors"][:50]
            for _ in range(2):
                for e in entries:
                    fd = os.open(m.file(e["path"]), os.O_RDONLY)
                    try:
                        got = os.read(fd, 1 << 20)
                    finally:
                        os.close(fd)
                    self.assertTrue(got == torch_bytes(expected[tuple(e["key"])]), e["path"])
        opens = m.stderr_text.count("opcode: OPEN ")
        self.assertGreater(m.stderr_text.count("opcode: READ "), 0, "the -d log shows no request")
        self.assertLessEqual(opens, 2, f"{opens} OPEN requests for 100 opens")  # index.json's + one
        self.assertEqual(m.stderr_text.count("opcode: RELEASE "), 0)

    def test_prefetch_follows_the_state_dict_not_the_file(self):
        """torch stores its records sorted as text (data/1, data/10, data/11, data/2, ...), so a
        reader going through the state dict jumps across the file. Reading w1 to its end must
        load the start of w2 (data/2) ahead, not the record the file holds after data/1: w2
        then costs no miss, and nothing loaded ahead is thrown away unread."""
        with tempfile.TemporaryDirectory(prefix="ckptfs-order-") as d:
            path = os.path.join(d, "order.pt")
            torch.manual_seed(0)
            sd = {f"w{i}": torch.randn(512 * 1024) for i in range(12)}  # 2 MiB each
            torch.save(sd, path)
            with zipfile.ZipFile(path) as z:
                records = [i.filename.rsplit("/", 1)[-1] for i in z.infolist() if "/data/" in i.filename]
            self.assertEqual(records[:4], ["0", "1", "10", "11"], "torch no longer sorts records as text")
            with Mount(path, "--limit-mb", "256") as m:
                self.assertGreaterEqual(m.stats()["blocks"], 32)

                def read_all(key):
                    with open(m.file(key), "rb", buffering=0) as f:
                        got = b"".join(iter(lambda: f.read(1 << 20), b""))
                    self.assertTrue(got == torch_bytes(sd[key]), key)

                def settled():
                    """Stats once prefetch has stopped loading (it is asynchronous): the count
                    unchanged for 0.2 s, waiting up to 10 s on a loaded machine."""
                    last, still = m.stats(), 0
                    for _ in range(200):
                        time.sleep(0.05)
                        now = m.stats()
                        still = still + 1 if now["prefetched"] == last["prefetched"] else 0
                        if still >= 4:
                            return now
                        last = now
                    return last

                read_all("w0")
                read_all("w1")
                before = settled()
                read_all("w2")
                after = m.stats()
                self.assertEqual(after["misses"] - before["misses"], 0,
                                 f"reading w2 missed the cache: before {before}, after {after}")
                self.assertGreater(after["prefetch_hits"], before["prefetch_hits"])
                self.assertEqual(after["prefetch_wasted"], 0)

    def test_stats_file_is_fresh_on_every_read_with_a_constant_size(self):
        """The kernel may cache the stats file (opens are skipped), so its freshness comes from
        a new mtime on every getattr; its size never changes, so a size taken before a read
        always holds the text that read renders."""
        with Mount(self.paths["many"], "--limit-mb", "8") as m:
            stats = m.file(".ckptfs/stats")
            seen = []
            for e in m.index()["tensors"][:20]:
                size = os.stat(stats).st_size
                with open(stats, "rb") as f:
                    text = f.read()
                self.assertEqual(len(text), size)
                seen.append(json.loads(text)["lookups"])
                with open(m.file(e["path"]), "rb") as f:
                    f.read()
            self.assertEqual(seen, sorted(seen))
            self.assertGreater(seen[-1], seen[0], f"stats did not change across 20 reads: {seen}")
            self.assertEqual(len(set(seen)), len(seen), f"a read of stats was not fresh: {seen}")

    def test_mount_a_subtree_with_root(self):
        expected = torch_tensors(torch.load(self.paths["lightning"]))
        with Mount(self.paths["lightning"], "--root", "state_dict") as m:
            names = set(os.listdir(m.path))
            self.assertIn("0.weight", names)
            self.assertIn(".ckptfs", names)
            self.assertNotIn("epoch.json", names)
            index = m.index()["tensors"]
            want = {k for k in expected if k[0] == "state_dict"}
            self.assertEqual({tuple(e["key"]) for e in index}, want)  # key paths stay full
            for e in index:
                self.assertFalse(e["path"].startswith("state_dict/"))
                with open(m.file(e["path"]), "rb") as f:
                    self.assertEqual(f.read(), torch_bytes(expected[tuple(e["key"])]))
                # The sidecar and view, found through their raw file under the new root.
                self.assertEqual(e["sidecar"], e["path"] + ".json")
                with open(m.file(e["sidecar"])) as f:
                    self.assertEqual(json.load(f)["path"], e["path"])
                self.assertEqual(np.load(m.file(e["npy"])).tobytes(), torch_bytes(expected[tuple(e["key"])]))
            self.assertFalse(os.path.exists(m.file("state_dict")))
        mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
        try:
            from ckptfs_testlib import run_ckptfs
            r = run_ckptfs("--root", "no/such/dir", self.paths["lightning"], mnt)
            self.assertEqual(r.returncode, 1)
            self.assertIn("--root", r.stderr)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1)
        finally:
            os.rmdir(mnt)

    def test_root_tensor(self):
        path = self.paths["root_tensor"]
        t = torch.load(path)
        with Mount(path) as m:
            with open(m.file("tensor"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(t))
            self.assertEqual(m.index()["tensors"][0]["key"], [])

    def test_numpy_memmap_and_partial_reads(self):
        path = self.paths["views"]
        expected = torch_tensors(torch.load(path))
        with Mount(path) as m:
            for e in m.index()["tensors"]:
                t = expected[tuple(e["key"])]
                if t.numel() == 0 or t.dtype == torch.bfloat16:
                    continue
                mm = np.memmap(m.file(e["path"]), dtype=NUMPY_OF[e["dtype"]], mode="r", shape=tuple(e["shape"]))
                np.testing.assert_array_equal(np.asarray(mm), t.contiguous().numpy())
                del mm
            # Odd offsets and lengths inside a strided view gather the right bytes.
            t = expected[("permuted",)]
            want = torch_bytes(t)
            with open(m.file("permuted"), "rb") as f:
                for off, n in [(1, 3), (5, 17), (99, 200), (len(want) - 7, 50), (len(want), 10)]:
                    f.seek(off)
                    self.assertEqual(f.read(n), want[off:off + n], (off, n))

    def test_tree_stat_du_and_values(self):
        path = self.paths["lightning"]
        with Mount(path) as m:
            st = os.stat(m.path)
            self.assertTrue(stat.S_ISDIR(st.st_mode))
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o555)
            w = os.stat(m.file("state_dict/0.weight"))
            self.assertEqual(stat.S_IMODE(w.st_mode), 0o444)
            self.assertEqual(w.st_size, 16 * 8 * 4)
            self.assertEqual(int(w.st_mtime), int(os.stat(path).st_mtime))
            side = os.stat(m.file("state_dict/0.weight.json"))
            self.assertEqual(side.st_blocks, 0)
            # du counts the tensor bytes and (almost) nothing else.
            total = sum(e["nbytes"] for e in m.index()["tensors"])
            du = int(subprocess.run(["du", "-s", "-B1", m.path], capture_output=True, text=True, check=True).stdout.split()[0])
            self.assertGreaterEqual(du, total)
            self.assertLess(du, total + 512 * (len(m.index()["tensors"]) + 1))
            ls = subprocess.run(["ls", "-l", m.file("state_dict")], capture_output=True, text=True, check=True).stdout
            self.assertIn("0.weight.json", ls)
            # Non-tensor values are JSON files holding the value.
            for rel, want in [("epoch.json", 3), ("global_step.json", 1234), ("pytorch-lightning_version.json", "1.9.0"),
                              ("hyper_parameters/lr.json", 1e-3), ("hyper_parameters/big.json", 2**70),
                              ("hyper_parameters/unicode.json", "gr\u00fc\u00dfe \u2603"),
                              ("optimizer_states/0/param_groups/0/lr.json", 1e-3),
                              ("optimizer_states/0/param_groups/0/betas/1.json", 0.999)]:
                with open(m.file(rel)) as f:
                    self.assertEqual(json.load(f), want, rel)
            with open(m.file("hyper_parameters/args.json")) as f:
                ns = json.load(f)
            self.assertEqual(ns["__class__"], "argparse.Namespace")
            self.assertEqual(ns["state"]["layers"], [8, 16, 4])
            # Int keys of optimizer state are directories named by the number, key path keeps ints.
            keys = [e["key"] for e in m.index()["tensors"]]
            self.assertIn(["optimizer_states", 0, "state", 0, "exp_avg"], keys)
            # A '/' inside a key is escaped, never a directory level.
            cb = os.listdir(m.file("callbacks"))
            self.assertEqual(cb, ["ModelCheckpoint{'monitor': 'val%2Floss', 'mode': 'min'}"])

    def test_name_rules(self):
        with Mount(self.paths["names"]) as m:
            names = set(os.listdir(m.path))
            for n in ["a%2Fb", "100%25", "%empty", "%2E", "%2E%2E", "w", "w.json", "3", "3~1", ".ckptfs", ".ckptfs~1"]:
                self.assertIn(n, names)
            # The tensor keyed "w.json" keeps its name; w's sidecar steps aside.
            by_key = {tuple(e["key"]): e for e in m.index()["tensors"]}
            self.assertEqual(by_key[("w.json",)]["path"], "w.json")
            self.assertEqual(by_key[("w",)]["sidecar"], "w~1.json")
            self.assertEqual(by_key[(3,)]["path"], "3")
            self.assertEqual(by_key[("3",)]["path"], "3~1")
            self.assertTrue(all(len(n.encode()) <= 255 for n in names))
            with open(m.file("dir/w.json.json")) as f:
                self.assertEqual(json.load(f), "a string, not the sidecar")
            self.assertEqual(by_key[("v",)]["npy"], "v~1.npy")
            self.assertEqual(by_key[("v",)]["sidecar"], "v.json")
            self.assertEqual(by_key[("v.npy",)]["path"], "v.npy")

    def test_pieces_at_any_offset_both_cold_and_cached(self):
        # Replies come from the cache's blocks when they are loaded and from a copy when not:
        # reads crossing the .npy header's end and the views' gaps must give the same bytes
        # both times. The first pass loads the daemon's blocks; dropping the kernel's pages in
        # between sends the second pass to the daemon again, which then finds them loaded.
        expected = torch_tensors(torch.load(self.paths["views"]))
        with Mount(self.paths["views"]) as m:
            for e in m.index()["tensors"]:
                t = expected[tuple(e["key"])]
                raw = torch_bytes(t)
                buf = io.BytesIO()
                np.save(buf, t.contiguous().numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().view("<u2"))
                npy = buf.getvalue()
                for path, want in ((e["path"], raw), (e["npy"], npy)):
                    fd = os.open(m.file(path), os.O_RDONLY)
                    try:
                        for _ in range(2):
                            for size in (7, 61, 4099):
                                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                                got = b"".join(os.pread(fd, size, off) for off in range(0, len(want), size))
                                self.assertEqual(got, want, f"{path} in pieces of {size}")
                    finally:
                        os.close(fd)

    def test_listing_matches_lookups(self):
        # Sidecars and views are not stored per tensor but derived from the raw file's name,
        # unless a clash renamed them: listings and lookups must still agree, name for name.
        obj = torch.load(self.paths["names"])
        with Mount(self.paths["names"]) as m:
            inodes = {}
            for top, dirs, files in os.walk(m.path):
                names = dirs + files
                self.assertEqual(len(names), len(set(names)), top)
                for n in names:
                    st = os.lstat(os.path.join(top, n))
                    rel = os.path.relpath(os.path.join(top, n), m.path)
                    self.assertNotIn(st.st_ino, inodes, f"{rel} shares an inode with {inodes.get(st.st_ino)}")
                    inodes[st.st_ino] = rel
            listed = set(inodes.values())
            for e in m.index()["tensors"]:
                for what in ("path", "sidecar", "npy"):
                    self.assertIn(e[what], listed, e)
                with open(m.file(e["sidecar"])) as f:
                    side = json.load(f)
                self.assertEqual((side["key"], side["path"]), (e["key"], e["path"]))
                want = torch_bytes(obj[e["key"][0]] if len(e["key"]) == 1 else obj["dir"]["w"])
                with open(m.file(e["path"]), "rb") as f:
                    self.assertEqual(f.read(), want, e["path"])
                self.assertEqual(np.load(m.file(e["npy"])).tobytes(), want, e["npy"])
            # A derived name of a renamed file belongs to nothing.
            self.assertFalse(os.path.exists(m.file("v~1.json")))
            self.assertFalse(os.path.exists(m.file("w~1.npy")))
            self.assertFalse(os.path.exists(m.file("dir/w.json.npy")))

    def test_read_only(self):
        """Writes fail, even when -o asks for a writable mount: the kernel opens files without
        asking the daemon, so only the mount's read-only flag refuses them."""
        want = torch_bytes(torch.load(self.paths["dtypes"])["float32"])
        for extra in ([], ["-o", "rw"]):
            with self.subTest(extra=extra), Mount(self.paths["dtypes"], *extra) as m:
                for mode in ("r+b", "wb", "ab"):
                    with self.assertRaises(OSError) as cm:
                        open(m.file("float32"), mode)
                    self.assertEqual(cm.exception.errno, errno.EROFS)
                with self.assertRaises(OSError):
                    os.mkdir(m.file("newdir"))
                with open(m.file("float32"), "rb") as f:
                    self.assertTrue(f.read() == want)

    def assert_dropped_only_by_reclaim(self, resident, reclaimed, stats=None):
        """|resident|: file -> (pages cached, pages) just before the file's read, for files the
        daemon stored whole. A page dropped by someone else before its read is read again,
        rightly: these VMs run DAMON, which drops page-cache pages touched at most once within
        seconds. With no such reclaimer running (|reclaimed|: reclaim_ran_since()), a stored
        page that went missing is a failure, and so is every file lost. Returns the files that
        lost pages."""
        dropped = {k for k, (cached, pages) in resident.items() if cached != pages}
        lost = {k: resident[k] for k in dropped}
        self.assertFalse(dropped and not reclaimed, "stored pages left the page cache before their "
                         f"read, with no reclaim running: {lost}; stats {stats}")
        self.assertLess(len(dropped), len(resident),
                        f"every stored file was reclaimed before its read: nothing left to check ({lost})")
        return dropped

    def test_lookup_preloads_exact_bytes(self):
        """Once the kernel's share of the budget has filled, a LOOKUP of a tensor file of
        256 KiB or more has the daemon store its first MiBs in the page cache: the reader then
        finds them there (no READ request for a file stored whole) and they are exactly torch's
        bytes, for raw files, .npy views, bfloat16 and a strided view alike. Before the share
        fills, a file over the cap beyond it, smaller files, and --no-preload: nothing stored.
        Pages that a reclaimer outside ckptfs dropped before their read are left out (these VMs'
        DAMON did, once in dozens of runs), never when nothing was reclaiming."""
        with tempfile.TemporaryDirectory(prefix="ckptfs-preload-") as d:
            path = os.path.join(d, "preload.pt")
            g = torch.Generator().manual_seed(5)
            sd = {"a": torch.randn(512 * 1024, generator=g),                      # 2 MiB
                  "b": torch.randn(1024 * 1024, generator=g).to(torch.bfloat16),  # 2 MiB
                  "c": torch.randn(1024, 1024, generator=g)[:, 512:],            # 2 MiB, strided
                  "big": torch.randn(1024 * 1024, generator=g),                  # 4 MiB
                  "small": torch.randn(1000, generator=g),                        # 4000 B
                  "filler": torch.randn(12 * 1024 * 1024, generator=g)}           # 48 MiB
            torch.save(sd, path)
            expected = torch_tensors(torch.load(path))
            reclaim_before = reclaim_counters()
            # --prelist 0: the daemon's own listing would spare the reader every LOOKUP.
            with Mount(path, "-d", "--limit-mb", "64", "--prelist", "0") as m:
                budget = m.stats()["kernel_budget_bytes"]
                cap = min(8 << 20, budget // 16)
                self.assertEqual(cap, 3 << 20, "--limit-mb 64 no longer stores 3 MiB per file")
                files = []  # (path, bytes a reader gets)
                for e in m.index()["tensors"]:
                    if e["path"] == "filler":
                        continue
                    t = expected[tuple(e["key"])]
                    buf = io.BytesIO()
                    arr = t.contiguous().numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().view("<u2")
                    np.save(buf, arr)
                    files += [(e["path"], torch_bytes(t)), (e["npy"], buf.getvalue())]
                eligible = [(rel, want) for rel, want in files if len(want) >= 256 << 10]
                self.assertEqual(len(eligible), 8)
                # The share empty: nothing is stored. Reading the filler fills it.
                with open(m.file("filler"), "rb") as f:
                    self.assertTrue(f.read() == torch_bytes(sd["filler"]))
                s = m.stats()
                self.assertEqual(s["preloaded_files"], 0, s)
                self.assertGreaterEqual(s["kernel_served_bytes"], budget - budget // 16, s)
                # One LOOKUP at a time: the daemon keeps only the newest few preloads queued,
                # and this test wants each one done.
                inos, done, want_bytes = {}, 0, 0
                for rel, want in files:
                    inos[rel] = os.stat(m.file(rel)).st_ino  # the LOOKUP
                    if len(want) >= 256 << 10:
                        done += 1
                        want_bytes += min(len(want), cap)
                    deadline = time.monotonic() + 20
                    while m.stats()["preloaded_bytes"] < want_bytes and time.monotonic() < deadline:
                        time.sleep(0.02)
                    s = m.stats()
                    self.assertEqual((s["preloaded_files"], s["preloaded_bytes"]), (done, want_bytes), rel)

                log_before = len(m.stderr_text_now())
                resident = {}  # rel -> (pages cached, pages) just before its read
                for rel, want in files:
                    resident[rel] = resident_pages(m.file(rel))
                    self.assertTrue(memmap_bytes(m.file(rel)) == want, f"{rel}: bytes differ from torch.load")
                log = m.stderr_text_now()[log_before:]
                s = m.stats()  # for the message below: invalidations, preloads, retries
                reclaimed = reclaim_ran_since(reclaim_before)
            stored_whole = {inos[rel] for rel, want in eligible if len(want) <= cap}
            self.assertEqual(len(stored_whole), 6)
            names = {ino: rel for rel, ino in inos.items()}
            dropped = {inos[rel] for rel in self.assert_dropped_only_by_reclaim(
                {names[i]: resident[names[i]] for i in stored_whole}, reclaimed, s)}
            read_from = nodeids_read(log)
            self.assertFalse(read_from & (stored_whole - dropped), "files stored whole were read again: "
                             f"{sorted(names[i] for i in read_from & (stored_whole - dropped))}; "
                             f"stats {s}")
            self.assertIn(inos["big"], read_from, "the part past the cap was not read: the test sees no READ")
            self.assertIn(inos["small"], read_from)
            with Mount(path, "--no-preload", "--limit-mb", "64") as m:
                with open(m.file("filler"), "rb") as f:
                    f.read()
                for rel, want in files:
                    os.stat(m.file(rel))
                time.sleep(0.5)
                self.assertEqual(m.stats()["preloaded_files"], 0)
                with open(m.file("a"), "rb") as f:
                    self.assertTrue(f.read() == dict(files)["a"])

    def test_the_daemon_lists_the_tree_after_mounting(self):
        """After mounting, the daemon lists the tree through the mount, breadth-first, up to
        --prelist entries, so that the kernel holds them: a reader that opens files by name
        without listing anything sends no LOOKUP and gets torch's bytes. The cap holds, the
        default follows --limit-mb, and an unmount while the listing runs is not refused
        (the daemon lists through a detached clone of the mount, which is no use of it)."""
        def wait_listed(m):
            deadline = time.monotonic() + 20
            while not (s := m.stats())["prelist_finished"]:
                self.assertLess(time.monotonic(), deadline, f"the listing did not end: {s}")
                time.sleep(0.02)
            return s

        def tree_entries(root):
            """Every entry under |root|, by our own walk (/.ckptfs counted, not entered)."""
            count, dirs = 0, [root]
            while dirs:
                with os.scandir(dirs.pop()) as it:
                    for e in it:
                        count += 1
                        if e.is_dir() and e.path != os.path.join(root, ".ckptfs"):
                            dirs.append(e.path)
            return count

        with tempfile.TemporaryDirectory(prefix="ckptfs-prelist-") as d:
            path = os.path.join(d, "prelist.pt")
            g = torch.Generator().manual_seed(11)
            sd = {f"t{i}": torch.randn(4096, generator=g) for i in range(20)}
            sd["sub"] = {"a": torch.randn(100, generator=g), "deeper": {"b": torch.arange(7)}}
            sd["epoch"] = 3
            torch.save(sd, path)
            loaded = torch.load(path)
            names = [f"t{i}" for i in range(20)] + ["sub/a", "sub/deeper/b"]
            want = {k: torch_bytes(loaded[k] if "/" not in k else
                                   loaded["sub"]["a"] if k == "sub/a" else loaded["sub"]["deeper"]["b"])
                    for k in names}

            with Mount(path, "-d", "--limit-mb", "64") as m:
                s = wait_listed(m)
                log_before = len(m.stderr_text_now())
                for k in names:
                    self.assertTrue(memmap_bytes(m.file(k)) == want[k], f"{k}: bytes differ from torch.load")
                log = m.stderr_text_now()[log_before:]
                self.assertNotIn("opcode: LOOKUP ", log, "files the daemon listed were looked up")
                self.assertIn("opcode: READ ", log)  # the log does show this reader's requests
                # 64 MiB of budget allow 1,024 entries: all of this tree's.
                self.assertEqual(s["prelisted_entries"], tree_entries(m.path), s)

            # Breadth-first, and no more than asked: the root's first entries only, so the
            # deepest file needs its LOOKUPs.
            with Mount(path, "-d", "--prelist", "10") as m:
                self.assertEqual(wait_listed(m)["prelisted_entries"], 10)
                log_before = len(m.stderr_text_now())
                with open(m.file("sub/deeper/b"), "rb") as f:
                    self.assertTrue(f.read() == want["sub/deeper/b"])
                self.assertIn("opcode: LOOKUP ", m.stderr_text_now()[log_before:])

            # An unmount while the listing runs: 30,000 entries take the daemon a while.
            many = os.path.join(d, "many.pt")
            torch.save({f"m{i}": torch.tensor([i]) for i in range(10000)}, many)
            with Mount(many, "--prelist", "30000") as m:
                listing = not m.stats()["prelist_finished"]
                r = subprocess.run(["fusermount3", "-u", m.path], capture_output=True, text=True, timeout=30)
                self.assertEqual(r.returncode, 0, f"unmount refused while the daemon listed: {r.stderr}")
                self.assertEqual(m.proc.wait(timeout=30), 0)
            self.assertTrue(listing, "the listing had ended before the unmount: nothing was checked")

            # SIGKILL while the listing runs: the daemon goes (a listing thread of its own would
            # wait for ever for a reply its killed request thread never sends), and the mount
            # is left for fusermount3 -u, as after any SIGKILL.
            with Mount(many, "--prelist", "30000") as m:
                listing = not m.stats()["prelist_finished"]
                m.proc.kill()
                try:
                    m.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    unmount(m.path, m.proc, m.conn)  # frees the stuck daemon, so the suite goes on
                    self.fail("SIGKILL during the listing: the daemon did not exit")
            self.assertTrue(listing, "the listing had ended before the SIGKILL: nothing was checked")

    def test_a_listed_stream_preloads_the_next_files(self):
        """A reader that listed the directory opens files with no LOOKUP, so nothing asks for
        their preloads; the READ at the start of a file it reaches cold then has the daemon
        store the next tensor files, small ones too (the listing made them known to the
        kernel): they are found whole in the page cache and read with no request, exactly
        torch's bytes; and the .npy views after a view. Without a listing, or once the kernel
        has forgotten the listed files (FORGET), nothing is stored ahead."""
        with tempfile.TemporaryDirectory(prefix="ckptfs-ahead-") as d:
            path = os.path.join(d, "ahead.pt")
            g = torch.Generator().manual_seed(7)
            sd = {"filler": torch.randn(12 * 1024 * 1024, generator=g)}  # 48 MiB
            # 64 KiB each: files of any size are stored ahead, five of them well within one
            # preload's bytes, so all five.
            ahead = [f"s{i}" for i in range(1, 6)]
            sd.update({f"s{i}": torch.randn(16 * 1024, generator=g) for i in range(6)})
            torch.save(sd, path)
            loaded = torch.load(path)
            want = {k: torch_bytes(v) for k, v in loaded.items()}

            def fill_the_share(m):
                with open(m.file("filler"), "rb") as f:
                    self.assertTrue(f.read() == want["filler"])
                s = m.stats()
                self.assertEqual(s["preloaded_files"], 0, s)
                return s

            def wait_ahead(m, count):
                deadline = time.monotonic() + 20
                while m.stats()["preloaded_ahead_files"] < count and time.monotonic() < deadline:
                    time.sleep(0.02)
                return m.stats()

            def read_s0(m):
                with open(m.file("s0"), "rb") as f:
                    self.assertTrue(f.read() == want["s0"])

            reclaim_before = reclaim_counters()
            with Mount(path, "-d", "--limit-mb", "64") as m:
                names = os.listdir(m.path)
                self.assertIn("s5", names)
                fill_the_share(m)
                read_s0(m)
                s = wait_ahead(m, len(ahead))
                self.assertEqual(s["preloaded_ahead_files"], len(ahead), s)
                resident = {k: resident_pages(m.file(k)) for k in ahead}
                inos = {k: os.stat(m.file(k)).st_ino for k in ahead}  # listed: no LOOKUP
                log_before = len(m.stderr_text_now())
                for k in ahead:
                    self.assertTrue(memmap_bytes(m.file(k)) == want[k], f"{k}: bytes differ from torch.load")
                # The .npy views the same way: the READ at the start of s0.npy stores the next
                # views (NPY header and data), which np.load then reads with no request.
                with open(m.file("s0.npy"), "rb") as f:
                    self.assertTrue(np.array_equal(np.load(f), loaded["s0"].numpy()))
                s = wait_ahead(m, 2 * len(ahead))
                self.assertEqual(s["preloaded_ahead_files"], 2 * len(ahead), s)
                views = [k + ".npy" for k in ahead]
                resident.update({v: resident_pages(m.file(v)) for v in views})
                inos.update({v: os.stat(m.file(v)).st_ino for v in views})
                for v in views:
                    with open(m.file(v), "rb") as f:
                        arr = np.load(f)
                    self.assertEqual(arr.dtype, np.float32, v)
                    self.assertTrue(np.array_equal(arr, loaded[v[:-4]].numpy()), f"{v}: values differ from torch.load")
                log = m.stderr_text_now()[log_before:]
                reclaimed = reclaim_ran_since(reclaim_before)
            dropped = self.assert_dropped_only_by_reclaim(resident, reclaimed)
            read_from = nodeids_read(log)
            again = sorted(k for k in inos if k not in dropped and inos[k] in read_from)
            self.assertFalse(again, f"files stored whole ahead were read again: {again}")
            self.assertNotIn("opcode: LOOKUP ", log, "the listing did not make the files known")

            # No listing (neither the reader's nor the daemon's, --prelist 0): s1 .. s5 are
            # unknown to the kernel when s0 is read.
            with Mount(path, "--limit-mb", "64", "--prelist", "0") as m:
                fill_the_share(m)
                read_s0(m)
                time.sleep(0.5)
                s = m.stats()
                self.assertEqual(s["preloaded_ahead_files"], 0, s)

            # Listed, then forgotten: dropping the dentry and inode caches makes the kernel
            # send a FORGET for every unused inode, the listed files among them.
            if os.geteuid() != 0:
                self.fail("root is needed to drop the kernel's inode cache (FORGET)")
            with Mount(path, "--limit-mb", "64") as m:
                self.assertIn("s5", os.listdir(m.path))
                fill_the_share(m)
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("2\n")
                time.sleep(0.5)  # FORGETs are sent in the background
                read_s0(m)
                time.sleep(0.5)
                s = m.stats()
                self.assertEqual(s["preloaded_ahead_files"], 0, s)
                self.assertEqual(s["preloads_refused"], 0, s)  # not even tried

    def test_a_stat_walk_has_few_files_preloaded_behind_it(self):
        """Each LOOKUP of a tensor file queues a preload, but a walk that stats many files and
        reads none must not leave a long queue of them to be read after it: at most a few
        LOOKUP preloads wait (the oldest are pushed out), so only the files stored while the
        walk ran and those few are read."""
        with tempfile.TemporaryDirectory(prefix="ckptfs-walk-") as d:
            path = os.path.join(d, "walk.pt")
            g = torch.Generator().manual_seed(3)
            sd = {"filler": torch.randn(8 * 1024 * 1024, generator=g)}  # 32 MiB
            sd.update({f"w{i}": torch.randn(1024 * 1024, generator=g) for i in range(100)})  # 4 MiB
            torch.save(sd, path)
            del sd
            # --prelist 0: a walk of files the daemon listed after mounting sends no LOOKUP.
            with Mount(path, "--limit-mb", "32", "--prelist", "0") as m:
                with open(m.file("filler"), "rb") as f:
                    while f.read(1 << 20):
                        pass
                for i in range(100):
                    os.stat(m.file(f"w{i}"))
                deadline = time.monotonic() + 20
                last = -1
                while time.monotonic() < deadline:  # until the notifier has gone quiet
                    time.sleep(0.3)
                    s = m.stats()
                    if s["preloaded_files"] == last:
                        break
                    last = s["preloaded_files"]
                self.assertGreater(s["preloaded_files"], 0, s)
                # A queue of every LOOKUP would have stored most of the 100.
                self.assertLess(s["preloaded_files"], 40, s)

    def test_stats_file(self):
        with Mount(self.paths["many"], "--limit-mb", "8") as m:
            for e in m.index()["tensors"][:200]:
                with open(m.file(e["path"]), "rb") as f:
                    f.read()
            with open(m.file(".ckptfs/stats")) as f:
                s = json.load(f)
            self.assertEqual(s["limit_bytes"], 8 << 20)
            self.assertEqual(s["hits"] + s["misses"], s["lookups"])
            self.assertGreater(s["bytes_read_from_checkpoint"], 0)
            self.assertLessEqual(s["daemon_resident_bytes"], 8 << 20)
            # The catalog's own memory: one arena chunk, then a few hundred bytes per tensor.
            self.assertEqual(s["tensors"], len(m.index()["tensors"]))
            self.assertGreater(s["catalog_bytes"], 0)
            self.assertLess(s["catalog_bytes"], (1 << 20) + 1024 * s["tensors"])

    def test_request_threads_run_with_a_short_slice(self):
        """The threads that answer requests ask the scheduler for 0.3 ms slices (Linux 6.12+),
        so that a reader's LOOKUP or IOCTL is not kept waiting behind the notifier's copies;
        the helper threads keep the kernel's default, and every thread keeps the nice value
        the daemon was started with."""
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        supported = (major, minor) >= (6, 12)
        with Mount(self.paths["many"], prefix=["nice", "-n", "5"]) as m:
            for e in m.index()["tensors"][:20]:  # make libfuse start more request threads
                with open(m.file(e["path"]), "rb") as f:
                    f.read()
            self.assertEqual(m.stats()["request_thread_slice_ns"], 300_000 if supported else 0)
            threads = {}
            for tid in os.listdir(f"/proc/{m.proc.pid}/task"):
                task = f"/proc/{m.proc.pid}/task/{tid}"
                try:
                    with open(f"{task}/comm") as f:
                        comm = f.read().strip()
                    slice_ns = None  # /proc/*/sched needs CONFIG_SCHED_DEBUG
                    if os.path.exists(f"{task}/sched"):
                        with open(f"{task}/sched") as f:
                            for line in f:
                                if line.startswith("se.slice"):
                                    slice_ns = int(float(line.split(":")[1]))
                    nice = os.getpriority(os.PRIO_PROCESS, int(tid))
                except (FileNotFoundError, ProcessLookupError):
                    continue  # a helper that ended meanwhile (the listing's, the readahead's)
                threads.setdefault(comm, []).append((slice_ns, nice))
            self.assertIn("ckptfs", threads)
            self.assertIn("ckptfs-notifier", threads)
            self.assertIn("ckptfs-prefetch", threads)
            self.assertEqual({nice for ts in threads.values() for _, nice in ts}, {5}, threads)
            if threads["ckptfs"][0][0] is None:
                print("\nNOTE: no se.slice in /proc/PID/task/TID/sched (CONFIG_SCHED_DEBUG off): "
                      "the threads' slices are not checked, only the stats file", file=sys.stderr)
                return
            for slice_ns, _ in threads["ckptfs"]:
                if supported:
                    self.assertEqual(slice_ns, 300_000, threads)
            for helper in ("ckptfs-notifier", "ckptfs-prefetch"):
                self.assertNotEqual(threads[helper][0][0], 300_000, threads)


if __name__ == "__main__":
    unittest.main()
