"""The examples run against a real mount and print what torch says (smoke tests that assert)."""
import os
import subprocess
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import Mount, require_fuse, torch_tensors  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class ExamplesTest(unittest.TestCase):
    def test_stream_numpy(self):
        require_fuse()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.pt")
            g = torch.Generator().manual_seed(2)
            torch.save({"w": torch.randn(30, 40, generator=g), "b": torch.randn(40, generator=g).to(torch.bfloat16),
                        "i": torch.arange(-5, 5), "wt": torch.randn(8, 9, generator=g).t()}, path)
            want = torch_tensors(torch.load(path))
            with Mount(path, "--limit-mb", "8") as m:
                out = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "examples", "stream_numpy.py"), m.path],
                                     capture_output=True, text=True, check=True).stdout
            rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
            for (key,), t in want.items():
                x = t.double()
                mean, lo, hi = (float(v) for v in rows[key][-3:])
                self.assertAlmostEqual(mean, x.mean().item(), places=4)
                self.assertAlmostEqual(lo, x.min().item(), places=4)
                self.assertAlmostEqual(hi, x.max().item(), places=4)
            self.assertIn("4 tensors", out)

    def mlp_checkpoint(self, tmp, layers=8, width=1024):
        """A state_dict bigger than the mount's budget: 8 x 4 MiB weights at --limit-mb 8."""
        path = os.path.join(tmp, "mlp.pt")
        torch.manual_seed(5)
        mods = []
        for i in range(layers):
            if i:
                mods.append(torch.nn.ReLU())
            mods.append(torch.nn.Linear(width, width))
        torch.save(torch.nn.Sequential(*mods).state_dict(), path)
        return path

    def run_example(self, script):
        """Runs examples/SCRIPT on a mount of an MLP bigger than --limit-mb, with --check."""
        require_fuse()
        with tempfile.TemporaryDirectory() as tmp:
            path = self.mlp_checkpoint(tmp)
            with Mount(path, "--limit-mb", "8") as m:
                r = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "examples", script), m.path, "--check", path],
                                   capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return r.stdout

    def test_streamed_linear(self):
        out = self.run_example("streamed_linear.py")
        self.assertIn("allclose with the in-memory model: True", out)
        self.assertIn("peak RSS", out)

    def test_load_state_dict(self):
        out = self.run_example("load_state_dict.py")
        self.assertIn("equal to torch.load: True", out)

if __name__ == "__main__":
    unittest.main()
