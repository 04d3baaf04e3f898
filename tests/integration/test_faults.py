"""Faults while mounted (issue #8): the disk failing under one record, the checkpoint
truncated, overwritten or deleted, readers killed mid-read, unmount with files open, signals
under load, and the daemon killed outright. Every case checks that no wrong byte is served, that
the daemon stays up (or exits cleanly when told to), and that no mount is left behind."""
import errno
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import (Mount, ReaderProcess, abort_connection, is_mounted, require_fuse,  # noqa: E402
                            torch_bytes)

MIB = 1 << 20
INJECTOR = os.environ.get("CKPTFS_EIO_INJECTOR", "")
NOTIFY_GATE = os.environ.get("CKPTFS_NOTIFY_GATE_LIB", "")


def record_offset(path, suffix):
    """Absolute offset and size of the data of the zip record whose name ends in |suffix|."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def preload_env(library, **variables):
    """The daemon's environment with |library| preloaded and |variables| set."""
    return dict(os.environ, LD_PRELOAD=library, **variables,
                # Under scripts/test-sanitizers the library is preloaded ahead of ASan's runtime.
                ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0")


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


class FaultsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_fuse()
        cls.tmp = tempfile.TemporaryDirectory(prefix="ckptfs-faults-")
        cls.pristine = os.path.join(cls.tmp.name, "pristine.pt")
        g = torch.Generator().manual_seed(8)
        # Storages in this order: w -> data/0, b -> data/1, small -> data/2 (torch numbers them
        # in pickling order). 4 MiB each: several 1 MiB cache blocks per tensor.
        cls.obj = {"w": torch.randn(1 << 20, generator=g), "b": torch.randn(1 << 20, generator=g),
                   "small": torch.arange(10, dtype=torch.int64)}
        torch.save(cls.obj, cls.pristine)
        loaded = torch.load(cls.pristine)
        cls.expected = {k: torch_bytes(v) for k, v in loaded.items()}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def copy(self, name):
        path = os.path.join(self.tmp.name, name)
        shutil.copyfile(self.pristine, path)
        return path

    def assert_eio(self, path, offset=0, length=None):
        with self.assertRaises(OSError) as cm:
            with open(path, "rb") as f:
                f.seek(offset)
                f.read(length if length is not None else -1)
        self.assertEqual(cm.exception.errno, errno.EIO, f"{path}: {cm.exception}")

    def test_disk_error_under_one_record(self):
        self.assertTrue(INJECTOR and os.path.exists(INJECTOR),
                        "CKPTFS_EIO_INJECTOR must name the built eio_injector library (run through ctest)")
        path = self.copy("eio.pt")
        b_off, b_len = record_offset(path, "data/1")
        # The bad range is inside b's third MiB: b's first MiB and every other record still read.
        bad = b_off + 2 * MIB
        env = preload_env(INJECTOR, CKPTFS_FAULT_FILE=path, CKPTFS_FAULT_RANGE=f"{bad}:4096")
        with Mount(path, "--limit-mb", "16", env=env) as m:
            for _ in range(2):  # a failed block is not cached: the second try fails the same way
                self.assert_eio(m.file("b"))
            with open(m.file("b"), "rb") as f:
                self.assertEqual(f.read(MIB), self.expected["b"][:MIB])
            self.assertEqual(read_file(m.file("w")), self.expected["w"])
            self.assertEqual(read_file(m.file("small")), self.expected["small"])
            stats = m.stats()
            self.assertIsNone(m.proc.poll(), "the daemon died on a disk error")
        self.assertGreaterEqual(stats["checkpoint_read_errors"], 2)
        self.assertGreaterEqual(stats["read_errors"], 2)
        self.assertFalse(stats["checkpoint_changed"])
        self.assertIn("Input/output error", m.stderr_text)

    def check_changed_file_refused(self, m, what):
        # Nothing of b was read before the change: none of it may be served now, since the
        # bytes on disk are no longer the ones the catalog describes.
        self.assert_eio(m.file("b"))
        self.assert_eio(m.file("b.npy"), offset=128)
        # Files made from the catalog still work, and so does the daemon.
        self.assertIn("b", {e["key"][0] for e in m.index()["tensors"]})
        with open(m.file("b.json")) as f:
            self.assertIn('"dtype"', f.read())
        stats = m.stats()
        self.assertTrue(stats["checkpoint_changed"], what)
        self.assertGreaterEqual(stats["read_errors"], 2)
        self.assertIsNone(m.proc.poll(), f"the daemon died when the checkpoint was {what}")

    def test_truncated_while_mounted(self):
        path = self.copy("truncated.pt")
        b_off, _ = record_offset(path, "data/1")
        with Mount(path, "--limit-mb", "16") as m:
            self.assertEqual(read_file(m.file("small")), self.expected["small"])
            os.truncate(path, b_off + MIB)
            self.check_changed_file_refused(m, "truncated")
            # Already served pages stay valid: they came from the file the catalog describes.
            self.assertEqual(read_file(m.file("small")), self.expected["small"])
        self.assertIn("was modified after it was opened", m.stderr_text)

    def test_overwritten_in_place(self):
        path = self.copy("overwritten.pt")
        b_off, b_len = record_offset(path, "data/1")
        with Mount(path, "--limit-mb", "16") as m:
            self.assertEqual(read_file(m.file("w")), self.expected["w"])
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\0" * b_len, b_off)  # same size: only the mtime tells
            finally:
                os.close(fd)
            self.check_changed_file_refused(m, "overwritten")
        self.assertIn("was modified after it was opened", m.stderr_text)

    def test_deleted_while_mounted_keeps_serving(self):
        # Deleting (or replacing by rename) does not change the open file: its bytes stay valid.
        path = self.copy("deleted.pt")
        with Mount(path, "--limit-mb", "8") as m:
            os.unlink(path)
            for key, want in self.expected.items():
                self.assertEqual(read_file(m.file(key)), want, key)
            self.assertFalse(m.stats()["checkpoint_changed"])

    def test_readers_killed_mid_read(self):
        path = self.copy("killed.pt")
        reader = ("import os,sys\n"
                  "while True:\n"
                  "    for n in ('w', 'b'):\n"
                  "        fd = os.open(os.path.join(sys.argv[1], n), os.O_RDONLY | os.O_DIRECT)\n"
                  "        os.read(fd, 4 << 20)\n"
                  "        os.close(fd)\n")
        rng = random.Random(3)
        with Mount(path, "--limit-mb", "8") as m:
            for _ in range(12):
                p = subprocess.Popen(["/usr/bin/python3", "-c", reader, m.path])
                time.sleep(rng.uniform(0.05, 0.4))
                p.kill()
                p.wait(timeout=30)
            self.assertIsNone(m.proc.poll(), "the daemon died when a reader was killed")
            for key, want in self.expected.items():
                self.assertEqual(read_file(m.file(key)), want, key)
            self.assertEqual(m.stats()["read_errors"], 0)

    def test_unmount_with_open_files(self):
        path = self.copy("busy.pt")
        with Mount(path) as m:
            fd = os.open(m.file("w"), os.O_RDONLY)
            mf = open(m.file("b"), "rb")
            mm = mmap.mmap(mf.fileno(), 0, prot=mmap.PROT_READ)
            try:
                r = subprocess.run(["fusermount3", "-u", m.path], capture_output=True, text=True)
                self.assertNotEqual(r.returncode, 0, "a busy mount was unmounted under its readers")
                self.assertTrue(is_mounted(m.path))
                subprocess.run(["fusermount3", "-u", "-z", m.path], check=True)
                self.assertFalse(is_mounted(m.path))
                # Detached, but what is open keeps working until it is closed.
                self.assertEqual(os.pread(fd, len(self.expected["w"]), 0), self.expected["w"])
                self.assertEqual(mm[:], self.expected["b"])
                self.assertIsNone(m.proc.poll())
            finally:
                mm.close()
                mf.close()
                os.close(fd)
            # The last close ends the daemon, cleanly.
            rc = m.proc.wait(timeout=30)
            m.stderr_file.seek(0)
            self.assertEqual(rc, 0, f"daemon's stderr: {m.stderr_file.read()}")

    def test_signals_under_load(self):
        path = self.copy("signals.pt")
        for sig in (signal.SIGTERM, signal.SIGINT):
            with Mount(path, "--limit-mb", "8") as m:
                # Their errors once the mount goes away are expected: stderr is not shown.
                readers = [ReaderProcess("random", m.path, "60", str(seed), "2", stderr=subprocess.DEVNULL)
                           for seed in range(2)]
                for r in readers:
                    r.go()
                time.sleep(1.5)
                m.proc.send_signal(sig)
                self.assertEqual(m.proc.wait(timeout=30), 0, f"{sig.name} under load: unclean exit")
                self.assertFalse(is_mounted(m.path), f"{sig.name} under load left the mount")
                for r in readers:
                    # They see errors (the mount is gone) but must not hang.
                    r.proc.wait(timeout=30)
                    r.proc.stdin.close()
                    r.proc.stdout.close()

    def test_signal_while_an_invalidation_waits_for_reads(self):
        """SIGTERM while the daemon's page-cache invalidation waits for pages whose READs are in
        flight. The kernel holds the invalidation until those READs are answered, so the daemon
        must keep answering until it is done; stopping the request loop first left it stuck in
        the kernel for ever, not even killable (seen once in ~5 runs of the suite, and every
        time with the gate below). The gate holds one invalidation until the signal has been
        sent and widens it to the whole file, which the readers are reading."""
        self.assertTrue(NOTIFY_GATE and os.path.exists(NOTIFY_GATE),
                        "CKPTFS_NOTIFY_GATE_LIB must name the built notify_gate library (run through ctest)")
        path = os.path.join(self.tmp.name, "gate.pt")
        # One 32 MiB tensor, 4x the limit: the readers' pages are invalidated all the time.
        torch.save({"w": torch.randn(8 << 20, generator=torch.Generator().manual_seed(3))}, path)
        gate = tempfile.mkdtemp(prefix="gate-", dir=self.tmp.name)
        env = preload_env(NOTIFY_GATE, CKPTFS_NOTIFY_GATE=gate)
        with Mount(path, "--limit-mb", "8", env=env) as m:
            readers = [ReaderProcess("random", m.path, "60", str(seed), "2", stderr=subprocess.DEVNULL)
                       for seed in range(2)]
            for r in readers:
                r.go()
            time.sleep(0.5)
            open(os.path.join(gate, "armed"), "w").close()
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(gate, "held")):
                self.assertLess(time.monotonic(), deadline, "no invalidation reached the gate in 30 s")
                time.sleep(0.01)
            m.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the readers are waiting for READs by now, whoever answers them
            open(os.path.join(gate, "go"), "w").close()
            try:
                rc = m.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                abort_connection(m.conn)  # frees the stuck daemon, so the suite goes on
                self.fail("SIGTERM with an invalidation waiting for READs: the daemon hung")
            self.assertEqual(rc, 0, "SIGTERM with an invalidation waiting for READs: unclean exit")
            with open(os.path.join(gate, "passed")) as f:
                self.assertFalse(f.read().startswith("errno"), "the held invalidation failed")
            self.assertFalse(is_mounted(m.path), "the mount was left behind")
            for r in readers:
                r.proc.wait(timeout=30)
                r.proc.stdin.close()
                r.proc.stdout.close()

    def test_sigkill_then_fusermount_recovers(self):
        path = self.copy("sigkill.pt")
        with Mount(path) as m:
            self.assertEqual(read_file(m.file("small")), self.expected["small"])
            m.proc.kill()
            m.proc.wait(timeout=30)
            # A name the kernel does not hold: its LOOKUP needs the daemon (the files the
            # daemon listed after mounting keep their cached attributes).
            with self.assertRaises(OSError) as cm:
                os.stat(m.file("no-such-tensor"))
            self.assertEqual(cm.exception.errno, errno.ENOTCONN)
            self.assertTrue(is_mounted(m.path), "expected the dead daemon's mount to remain")
            # The documented recovery (docs/reliability.md):
            subprocess.run(["fusermount3", "-u", m.path], check=True, timeout=30)
            self.assertFalse(is_mounted(m.path))


if __name__ == "__main__":
    unittest.main()
