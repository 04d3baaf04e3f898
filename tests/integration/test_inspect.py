"""`ckptfs ls` and `ckptfs info`: inspect without mounting (issue #6)."""
import collections
import json
import os
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_checkpoints  # noqa: E402
from ckptfs_testlib import Mount, dtype_name, run_ckptfs, torch_tensors  # noqa: E402


class InspectTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="ckptfs-inspect-")
        cls.lightning = gen_checkpoints.write(cls.tmp.name, "lightning")
        cls.legacy = gen_checkpoints.write(cls.tmp.name, "legacy_views")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_ls_lists_every_tensor_with_a_total(self):
        want = torch_tensors(torch.load(self.lightning))
        r = run_ckptfs("ls", self.lightning)
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertTrue(lines[0].startswith("path"))
        self.assertEqual(len(lines), len(want) + 2)
        total = sum(t.numel() * t.element_size() for t in want.values())
        self.assertTrue(lines[-1].startswith(f"{len(want)} tensors"), lines[-1])
        self.assertIn(f"({total} bytes)", lines[-1])
        # Columns are aligned: every row has its dtype at the header's dtype column.
        col = lines[0].index("dtype")
        self.assertTrue(all(line[col - 2:col] == "  " for line in lines[1:-1]))
        self.assertIn("state_dict/0.weight", r.stdout)

    def test_ls_patterns(self):
        glob = run_ckptfs("ls", self.lightning, "state_dict/*.weight").stdout.splitlines()
        self.assertEqual(len(glob) - 2, 3)
        prefix = run_ckptfs("ls", self.lightning, "optimizer_states/0/state/1").stdout.splitlines()
        want = torch_tensors(torch.load(self.lightning))
        self.assertEqual(len(prefix) - 2, sum(1 for k in want if k[:4] == ("optimizer_states", 0, "state", 1)))

    def test_ls_json_is_the_mounts_index(self):
        for path in (self.lightning, self.legacy):
            r = run_ckptfs("ls", "--json", path)
            self.assertEqual(r.returncode, 0, r.stderr)
            with Mount(path) as m:
                self.assertEqual(json.loads(r.stdout), m.index())

    def test_info(self):
        want = torch_tensors(torch.load(self.lightning))
        r = run_ckptfs("info", self.lightning)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("format:    torch zip", r.stdout)
        self.assertIn(f"tensors:   {len(want)} ", r.stdout)
        counts = collections.Counter(dtype_name(t) for t in want.values())
        for dtype, n in counts.items():
            self.assertRegex(r.stdout, rf"{dtype}\s+{n} tensors")
        self.assertIn("hyper_parameters", r.stdout)
        legacy = run_ckptfs("info", self.legacy).stdout
        self.assertIn("legacy stream", legacy)

    def test_errors(self):
        r = run_ckptfs("ls", os.path.join(self.tmp.name, "missing.pt"))
        self.assertEqual(r.returncode, 1)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1)
        self.assertEqual(run_ckptfs("ls").returncode, 2)
        self.assertEqual(run_ckptfs("info", "--bogus", self.lightning).returncode, 2)


if __name__ == "__main__":
    unittest.main()
