"""Benchmarks are not tests: this only proves scripts/bench-memory, bench-convert and
bench-throughput still run end to end at a tiny size and write their tables, and that
scripts/fuse-latency still traces a mount's requests (the numbers are not judged here)."""
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import BINARY, Mount, require_fuse  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class BenchSmokeTest(unittest.TestCase):
    def run_bench(self, script, args, rows, pngs=(), timeout=600):
        """Runs scripts/|script| into a temporary docs dir; checks its table has |rows| and that it
        drew |pngs|."""
        require_fuse()
        with tempfile.TemporaryDirectory(prefix="ckptfs-bench-smoke-") as out:
            r = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "scripts", script), *args,
                                "--out-dir", out, "--binary", BINARY],
                               capture_output=True, text=True, timeout=timeout)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            for name in pngs:
                self.assertGreater(os.path.getsize(os.path.join(out, name)), 10000)
            with open(os.path.join(out, "benchmarks.md")) as f:
                md = f.read()
            for row in rows:
                self.assertIn(row, md)

    def test_bench_memory_runs(self):
        self.run_bench("bench-memory", ["--size-mib", "32", "--limit-mb", "8"],
                       ["ckptfs --limit-mb 8", "| mmap |", "| torch.load |"], pngs=["bench-memory.png"])

    def test_bench_throughput_runs(self):
        self.run_bench("bench-throughput", ["--size-mib", "32", "--tiny-count", "300", "--rounds", "2",
                                            "--sizes-kib", "16,1024", "--sizes-total-mib", "8"],
                       ["| 1 | memmap + bf16 loop", "| 2 | second pass", "| 3 | mount 300 tensors of 1024 float32, cold; median of 3",
                        "| 3 | daemon memory per tensor", "| 4 | 2 processes",
                        "| #6 | ckptfs ls of the 300-tensor checkpoint", "| #6 | ckptfs info",
                        "| 1 | the same loop on a mount with --no-preload", "| 1 | the same loop on a mount with --prelist 0", "| 2 | minor page faults of the warm pass", "| 2 | numpy.memmap and close of a file",
                        "| 3 | open/read/close per file", "| 3 | ls -l of the directory (900 files",
                        "| tensor size | tensors | ckptfs | ckptfs, --prelist 0 |", "| 16 KiB | 512 |", "| 1 MiB | 8 |"],
                       pngs=["bench-throughput.png", "bench-throughput-sizes.png"], timeout=900)

    def test_bench_convert_runs(self):
        self.run_bench("bench-convert", ["--size-mib", "16", "--limit-mb", "8"],
                       ["| ckptfs convert (--limit-mb 8)", "| cp from a mount", "| torch.load + numpy writer"])

    def test_fuse_latency_traces_a_mount(self):
        # Needs root, perf (scripts/install-deps installs linux-perf) and a kernel with the fuse
        # tracepoints; the script's own one-line error fails this test where one is missing.
        with tempfile.TemporaryDirectory(prefix="ckptfs-latency-") as work:
            ckpt = os.path.join(work, "small.pt")
            subprocess.run(["/usr/bin/python3", "-c",
                            "import sys, torch; torch.save({'w': torch.arange(300000, dtype=torch.float32)}, sys.argv[1])",
                            ckpt], check=True)
            # --prelist 0: the daemon's own listing after mounting would spare dd the LOOKUP.
            with Mount(ckpt, "--prelist", "0") as m:
                r = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "scripts", "fuse-latency"),
                                    "--mount", m.path, "--", "dd", f"if={m.file('w')}", "of=/dev/null", "status=none"],
                                   capture_output=True, timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr.decode())
        lines = r.stdout.decode().splitlines()
        self.assertTrue(lines and lines[0].startswith("opcode"), r.stdout.decode())
        counts = {l.split()[0]: int(l.split()[1]) for l in lines[1:]}
        # dd of one file on a fresh mount: its LOOKUP, then the READs of its 1.2 MB.
        self.assertEqual(counts.get("FUSE_LOOKUP"), 1, counts)
        self.assertGreaterEqual(counts.get("FUSE_READ", 0), 1, counts)


if __name__ == "__main__":
    unittest.main()
