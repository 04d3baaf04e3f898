"""Bad and hostile input, and the daemon's lifecycle: clean one-line errors, no mount left
behind, nothing executed, EIO only on the broken file, clean unmount on signals (issue #2)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import BINARY, Mount, is_mounted, require_fuse, run_ckptfs, torch_bytes, unmount  # noqa: E402


class Evil:
    """Pickles as a call of os.system: torch.load would run it; ckptfs must not."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rezip(src, dst, replace):
    """Copies a torch zip, replacing the content of records named in |replace| (stored)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            zout.writestr(info.filename, data)


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
            with self.assertRaises(OSError) as cm:
                with open(m.file("b"), "rb") as f:
                    f.read()
            self.assertEqual(cm.exception.errno, 5)  # EIO
            with open(m.file("b.json")) as f:
                self.assertIn("error", json.load(f))
        self.assertIn("tensor 'b'", m.stderr_text)

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
