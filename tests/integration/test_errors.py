"""Bad and hostile input, and the daemon's lifecycle: clean one-line errors, no mount left
behind, nothing executed, EIO only on the broken file, clean unmount on signals (issue #2)."""
import collections
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import zipfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import BINARY, Mount, is_mounted, require_fuse, run_ckptfs, torch_bytes, unmount  # noqa: E402


class Evil:
    """Pickles as a call of os.system: torch.load would run it; ckptfs must not."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def proc_ppid(pid):
    """The parent of process |pid| (a string, as in /proc), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return None


def proc_argv(pid):
    """The argument vector of process |pid|, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return None


def rezip(src, dst, replace):
    """Copies a torch zip, replacing the content of records named in |replace| (stored)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            zout.writestr(info.filename, data)


class _StorageRef:
    def __init__(self, numel):
        self.numel = numel


class _Rebuild:
    """Pickles as torch's own _rebuild_tensor_v2(storage, offset, size, stride, ...) call."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def crafted_tensor_pickle(size, stride, offset=0, numel=20):
    """A data.pkl for {'w': tensor} whose size/stride/offset/numel are whatever we say."""
    import io
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(
        {"w": _Rebuild(_StorageRef(numel), offset, size, stride, False, collections.OrderedDict())})
    return buf.getvalue()


class ErrorsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_fuse()
        cls.tmp = tempfile.TemporaryDirectory(prefix="ckptfs-err-")
        cls.good = os.path.join(cls.tmp.name, "good.pt")
        cls.w = torch.randn(4, 5)
        torch.save({"w": cls.w, "b": torch.arange(6)}, cls.good)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def assert_eio(self, path):
        """Reading |path| fails with EIO: the answer for a tensor the daemon cannot serve."""
        with self.assertRaises(OSError) as cm:
            with open(path, "rb") as f:
                f.read()
        self.assertEqual(cm.exception.errno, errno.EIO, path)

    def assert_clean_failure(self, checkpoint, mountpoint=None, contains=""):
        mnt = mountpoint or tempfile.mkdtemp(prefix="ckptfs-mnt-")
        try:
            r = run_ckptfs(checkpoint, mnt)
            self.assertNotEqual(r.returncode, 0, r.stderr)
            lines = r.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, f"want one line on stderr, got: {r.stderr!r}")
            self.assertTrue(lines[0].startswith("ckptfs: "), lines[0])
            self.assertIn(contains, lines[0])
            self.assertNotIn("Traceback", r.stderr)
            if os.path.isdir(mnt):
                self.assertFalse(is_mounted(mnt), "a failed start left a mount behind")
            return lines[0]
        finally:
            if mountpoint is None:
                unmount(mnt)
                os.rmdir(mnt)

    def test_hostile_pickle_executes_nothing(self):
        marker = self.path("pwned")
        ckpt = self.path("evil.pt")
        torch.save({"w": self.w, "evil": Evil(marker), "list": [Evil(marker)]}, ckpt)
        with Mount(ckpt) as m:
            with open(m.file("w"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(self.w))
            with open(m.file("evil.json")) as f:
                self.assertEqual(json.load(f)["__class__"], "posix.system")
            for root, _, files in os.walk(m.path):
                for name in files:
                    with open(os.path.join(root, name), "rb") as f:
                        f.read()
        self.assertFalse(os.path.exists(marker), "the pickle's os.system call was executed")

    def test_empty_garbage_truncated(self):
        empty = self.path("empty.pt")
        open(empty, "wb").close()
        self.assert_clean_failure(empty, contains="empty")
        garbage = self.path("garbage.pt")
        with open(garbage, "wb") as f:
            f.write(os.urandom(5000))
        self.assert_clean_failure(garbage, contains="not a PyTorch checkpoint")
        fake_zip = self.path("fakezip.pt")
        with open(fake_zip, "wb") as f:
            f.write(b"PK\x03\x04" + os.urandom(5000))
        self.assert_clean_failure(fake_zip, contains="zip")
        data = open(self.good, "rb").read()
        for cut in (len(data) // 2, len(data) - 30, 100):
            trunc = self.path(f"trunc{cut}.pt")
            with open(trunc, "wb") as f:
                f.write(data[:cut])
            self.assert_clean_failure(trunc)

    def test_corrupt_pickle(self):
        bad = self.path("badpickle.pt")
        rezip(self.good, bad, {"data.pkl": lambda d: d[: len(d) // 2]})
        self.assert_clean_failure(bad, contains="pickle")
        bad2 = self.path("badpickle2.pt")
        rezip(self.good, bad2, {"data.pkl": b"\x80\x02\xff\xff\xff"})
        self.assert_clean_failure(bad2, contains="pickle")

    def test_missing_inputs(self):
        self.assert_clean_failure(self.path("does-not-exist.pt"), contains="No such file")
        self.assert_clean_failure(self.good, mountpoint=self.path("no-such-dir"), contains="mountpoint")
        r = run_ckptfs(self.good)
        self.assertEqual(r.returncode, 2)
        r = run_ckptfs("--limit-mb", "lots", self.good, self.tmp.name)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--limit-mb", r.stderr)

    def test_other_formats_named(self):
        script = self.path("script.pt")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
        self.assert_clean_failure(script, contains="TorchScript")

    def test_storage_too_small_gives_eio_on_that_file_only(self):
        bad = self.path("shortstorage.pt")
        rezip(self.good, bad, {"data/1": lambda d: d[:8]})
        with Mount(bad) as m:
            with open(m.file("w"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(self.w))
            self.assert_eio(m.file("b"))
            with open(m.file("b.json")) as f:
                self.assertIn("error", json.load(f))
        self.assertIn("tensor 'b'", m.stderr_text)

    def test_corrupt_local_header_gives_eio_on_that_file_only(self):
        """A record's local header is read when the record is first served, so damage there
        fails that tensor's reads (EIO, one line in the log) and nothing else."""
        import struct
        with zipfile.ZipFile(self.good) as z:
            header = next(i for i in z.infolist() if i.filename.endswith("/data/1")).header_offset
        cases = {
            "signature": (0, b"\0\0\0\0", "corrupt local header"),
            "name length": (26, struct.pack("<H", 3), "name length"),
        }
        for what, (at, patch, contains) in cases.items():
            with self.subTest(what):
                bad = self.path("badheader.pt")
                with open(self.good, "rb") as f:
                    data = bytearray(f.read())
                data[header + at:header + at + len(patch)] = patch
                with open(bad, "wb") as f:
                    f.write(data)
                with Mount(bad) as m:
                    size = os.stat(m.file("b.json")).st_size
                    self.assert_eio(m.file("b"))
                    with open(m.file("w"), "rb") as f:
                        self.assertEqual(f.read(), torch_bytes(self.w))
                    with open(m.file("b.json"), "rb") as f:
                        text = f.read()
                    self.assertEqual(len(text), size)
                    self.assertIsNone(json.loads(text)["source"]["file_offset"])
                    self.assertIsNone(m.proc.poll())
                self.assertIn(contains, m.stderr_text)
                self.assertIn("read of 'b'", m.stderr_text)

    def test_encrypted_record_is_not_served(self):
        """A storage record flagged encrypted in the central directory holds ciphertext: EIO on
        its tensor (the sidecar says why), never its bytes as data."""
        with zipfile.ZipFile(self.good) as z:
            target = next(i for i in z.infolist() if i.filename.endswith("/data/1")).filename
        with open(self.good, "rb") as f:
            data = bytearray(f.read())
        at = data.find(b"PK\x01\x02")
        while at >= 0:
            name_len = int.from_bytes(data[at + 28:at + 30], "little")
            if data[at + 46:at + 46 + name_len] == target.encode():
                data[at + 8] |= 1
                break
            at = data.find(b"PK\x01\x02", at + 4)
        self.assertGreaterEqual(at, 0)
        bad = self.path("encrypted.pt")
        with open(bad, "wb") as f:
            f.write(data)
        with Mount(bad) as m:
            self.assert_eio(m.file("b"))
            with open(m.file("b.json")) as f:
                self.assertIn("encrypted", json.load(f)["error"])
            with open(m.file("w"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(self.w))

    def test_bombs_are_refused_with_one_line(self):
        """Hostile data.pkl payloads in an otherwise valid torch zip (issue #8's bomb list)."""
        depth = 100000
        cases = {
            "deep nesting": (b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".", "nested deeper than"),
            "huge memo": (b"\x80\x02]r\xff\xff\xff\x7f.", "memo index"),
            "huge string": (b"\x80\x04\x8d" + (1 << 60).to_bytes(8, "little") + b"abc.", "pickle"),
            "huge frame": (b"\x80\x04\x95" + (1 << 62).to_bytes(8, "little") + b"N.", "pickle"),
            "mark bomb": (b"\x80\x02" + b"(" * 200000 + b"N.", "pickle"),
        }
        for what, (payload, contains) in cases.items():
            with self.subTest(what):
                bad = self.path("bomb.pt")
                rezip(self.good, bad, {"data.pkl": payload})
                r = run_ckptfs("ls", bad)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertIn(contains, r.stderr)
                self.assertLess(len(r.stderr), 400, "an error should be one readable line")

    def test_hostile_shapes_and_storages_give_eio_on_that_file(self):
        """Shapes whose byte count overflows, views and storages that point past the data: the
        tensor's file exists, its reads fail with EIO, its sidecar says why."""
        cases = {
            "overflowing shape": (crafted_tensor_pickle((1 << 40, 1 << 40, 1 << 40), (1, 1, 1)), "overflow"),
            "negative size": (crafted_tensor_pickle((-5,), (1,)), ""),
            "view past the storage": (crafted_tensor_pickle((4, 5), (5, 1), offset=10), ""),
            # torch.load refuses this one too ("Trying to resize storage that is not resizable").
            "storage declared smaller than the view": (crafted_tensor_pickle((4, 5), (5, 1), numel=7), ""),
            "stride past the storage": (crafted_tensor_pickle((2, 2), (1 << 60, 1)), ""),
            "shape and stride of different lengths": (crafted_tensor_pickle((4, 5), (1,)),
                                                      "shape has 2 dims but stride has 1"),
            "more dimensions than ckptfs serves": (crafted_tensor_pickle((1,) * 70000, (1,) * 70000),
                                                   "70000 dimensions; ckptfs serves at most 65535"),
        }
        for what, (payload, contains) in cases.items():
            with self.subTest(what):
                bad = self.path("hostile_shape.pt")
                rezip(self.good, bad, {"data.pkl": payload})
                with Mount(bad) as m:
                    self.assert_eio(m.file("w"))
                    with open(m.file("w.json")) as f:
                        err = json.load(f)["error"]
                    self.assertIn(contains, err)
                    self.assertIsNone(m.proc.poll())

    def test_a_tensor_broken_at_load_fails_at_open(self):
        """With a tensor known broken, the daemon keeps answering OPEN (instead of letting the
        kernel skip it): open() fails with EIO, so numpy.memmap raises instead of a reader
        dying of SIGBUS at its first page. The stats file stays fresh on that path too."""
        bad = self.path("broken_open.pt")
        rezip(self.good, bad, {"data.pkl": crafted_tensor_pickle((1 << 40, 1 << 40, 1 << 40), (1, 1, 1))})
        with Mount(bad, "-d") as m:
            for _ in range(2):
                with self.assertRaises(OSError) as cm:
                    os.close(os.open(m.file("w"), os.O_RDONLY))
                self.assertEqual(cm.exception.errno, errno.EIO)
            with self.assertRaises(OSError) as cm:
                np.memmap(m.file("w"), dtype="<f4", mode="r")
            self.assertEqual(cm.exception.errno, errno.EIO)
            first = m.stats()["read_errors"]
            with self.assertRaises(OSError):
                os.open(m.file("w"), os.O_RDONLY)
            self.assertEqual(m.stats()["read_errors"], first + 1)
        self.assertGreaterEqual(m.stderr_text.count("opcode: OPEN "), 6)

    def test_hundreds_of_dimensions_are_served(self):
        path = self.path("dims.pt")
        t = torch.arange(6.0).reshape([1] * 298 + [2, 3])
        torch.save({"w": t}, path)
        with Mount(path) as m:
            with open(m.file("w"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(t))
            with open(m.file("w.json")) as f:
                self.assertEqual(json.load(f)["shape"], list(t.shape))

    def test_storage_declared_larger_than_its_record_serves_what_torch_loads(self):
        bad = self.path("numel.pt")
        rezip(self.good, bad, {"data.pkl": crafted_tensor_pickle((4, 5), (5, 1), numel=1 << 50)})
        want = torch_bytes(torch.load(bad)["w"])
        with Mount(bad) as m:
            with open(m.file("w"), "rb") as f:
                self.assertEqual(f.read(), want)

    def test_daemon_mode_returns_when_ready(self):
        mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
        try:
            r = run_ckptfs(self.good, mnt)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertTrue(is_mounted(mnt), "ckptfs returned before the mount was ready")
            with open(os.path.join(mnt, "w"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(self.w))
            subprocess.run(["fusermount3", "-u", mnt], check=True)
            self.assertFalse(is_mounted(mnt))
        finally:
            unmount(mnt)
            os.rmdir(mnt)

    def test_signals_unmount(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
            proc = subprocess.Popen([BINARY, "-f", self.good, mnt], stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + 30
                while not is_mounted(mnt) and time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.02)
                self.assertTrue(is_mounted(mnt))
                proc.send_signal(sig)
                self.assertEqual(proc.wait(timeout=15), 0)
                self.assertFalse(is_mounted(mnt), f"{sig.name} left the mount behind")
            finally:
                unmount(mnt, proc)
                proc.stderr.close()
                os.rmdir(mnt)

    def test_daemon_with_relative_mountpoint_unmounts_on_signal(self):
        """The daemon changes to / when it detaches: a mountpoint given relative to where it
        started must still be the one it unmounts at SIGTERM (it was left behind, reporting
        "Transport endpoint is not connected")."""
        parent = tempfile.mkdtemp(prefix="ckptfs-rel-")
        mnt = os.path.join(parent, "m")
        os.mkdir(mnt)
        argv = [BINARY, self.good, "m"]
        try:
            r = subprocess.run(argv, cwd=parent, capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertTrue(is_mounted(mnt))
            pids = [p for p in os.listdir("/proc") if p.isdigit() and proc_argv(p) == argv]
            # The daemon's listing child shows the daemon's argv for the moment between its
            # spawn and its exec: it is the daemon's child, the daemon is not.
            pids = [p for p in pids if proc_ppid(p) not in pids]
            self.assertEqual(len(pids), 1, f"daemon processes {pids}")
            os.kill(int(pids[0]), signal.SIGTERM)
            deadline = time.monotonic() + 15
            while is_mounted(mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertFalse(is_mounted(mnt), "SIGTERM left the relative mountpoint mounted")
        finally:
            unmount(mnt)
            os.rmdir(mnt)
            os.rmdir(parent)

    def test_help_and_version(self):
        r = run_ckptfs("--help")
        self.assertEqual(r.returncode, 0)
        for opt in ("--limit-mb", "--foreground", "--debug", "-o", "--version"):
            self.assertIn(opt, r.stdout)
        r = run_ckptfs("-V")
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"^ckptfs \d+\.\d+\.\d+")


if __name__ == "__main__":
    unittest.main()
