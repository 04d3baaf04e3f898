"""Sharded checkpoints and several files as one tree (issue #7): Hugging Face style shards
(torch.save per shard + *.bin.index.json, and the .safetensors flavour written by the test
suite's independent writer) mount as one tree, each tensor byte-exact against torch; several
checkpoints given together merge; duplicates and broken indexes fail with one line."""
import json
import os
import sys
import tempfile
import time
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import Mount, is_mounted, require_fuse, run_ckptfs, torch_bytes  # noqa: E402
from test_convert import read_safetensors  # noqa: E402
from test_formats import write_safetensors  # noqa: E402

ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
            torch.int8: "I8", torch.bool: "BOOL", torch.float64: "F64"}


def make_state_dict(n_layers=6):
    g = torch.Generator().manual_seed(21)
    sd = {}
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    for i in range(n_layers):
        dt = dtypes[i % len(dtypes)]
        sd[f"model.layers.{i}.weight"] = torch.randn(32, 16, generator=g).to(dt)
        sd[f"model.layers.{i}.bias"] = torch.randn(32, generator=g).to(dt)
    sd["model.embed.weight"] = torch.randn(50, 16, generator=g)
    sd["model.ids"] = torch.arange(7, dtype=torch.int64)
    sd["model.mask"] = torch.rand(9, generator=g) > 0.5
    sd["lm_head.weight"] = torch.randn(50, 16, generator=g).to(torch.int8)
    return sd


def write_shards(directory, sd, n_shards, flavour):
    """Splits |sd| round-robin into shards named as transformers names them, plus the index."""
    keys = list(sd)
    ext = "bin" if flavour == "bin" else "safetensors"
    prefix = "pytorch_model" if flavour == "bin" else "model"
    weight_map = {}
    for s in range(n_shards):
        name = f"{prefix}-{s + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {k: sd[k] for k in keys[s::n_shards]}
        path = os.path.join(directory, name)
        if flavour == "bin":
            torch.save(part, path)
        else:
            write_safetensors(path, {k: (ST_NAMES[t.dtype], tuple(t.shape), torch_bytes(t)) for k, t in part.items()})
        for k in part:
            weight_map[k] = name
    index = os.path.join(directory, f"{prefix}.{ext}.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                   "weight_map": weight_map}, f)
    return index


class ShardsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_fuse()
        cls.tmp = tempfile.TemporaryDirectory(prefix="ckptfs-shards-")
        cls.sd = make_state_dict()
        cls.dirs = {}
        cls.indexes = {}
        for flavour in ("bin", "safetensors"):
            d = os.path.join(cls.tmp.name, flavour)
            os.makedirs(d)
            cls.indexes[flavour] = write_shards(d, cls.sd, 3, flavour)
            cls.dirs[flavour] = d
        # The truth: what torch.load gives for each .bin shard (the safetensors flavour holds
        # the same tensors, written from these).
        cls.expected = {}
        for name in sorted(os.listdir(cls.dirs["bin"])):
            if name.endswith(".bin"):
                for k, t in torch.load(os.path.join(cls.dirs["bin"], name)).items():
                    cls.expected[k] = torch_bytes(t)
        assert sorted(cls.expected) == sorted(cls.sd)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def check_mount(self, m):
        index = m.index()
        self.assertEqual(sorted(e["path"] for e in index["tensors"]), sorted(self.expected))
        for key, want in self.expected.items():
            with open(m.file(key), "rb") as f:
                self.assertEqual(f.read(), want, key)
        self.assertIn("3 files", index["format"])

    def test_index_and_directory_mount_as_one_tree(self):
        for flavour in ("bin", "safetensors"):
            for target in (self.indexes[flavour], self.dirs[flavour]):
                with self.subTest(flavour=flavour, target=os.path.basename(target)):
                    # A small limit: reads go through the cache, evicting across shards.
                    with Mount(target, "--limit-mb", "8") as m:
                        self.check_mount(m)
                        got, _ = read_safetensors(m.file(".ckptfs/model.safetensors"))
                        self.assertEqual({k: v[2] for k, v in got.items()}, self.expected)

    def test_several_files_merge_and_duplicates_fail(self):
        a = os.path.join(self.tmp.name, "a.pt")
        b = os.path.join(self.tmp.name, "b.pt")
        torch.save({"encoder": {"w": torch.ones(3)}, "epoch": 1}, a)
        torch.save({"encoder": {"v": torch.zeros(2, dtype=torch.int16)}, "decoder": {"w": torch.arange(4.0)}}, b)
        with Mount(a, b) as m:
            self.assertEqual(sorted(os.listdir(m.file("encoder"))), ["v", "v.json", "v.npy", "w", "w.json", "w.npy"])
            with open(m.file("decoder/w"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(torch.arange(4.0)))
            with open(m.file("encoder/v"), "rb") as f:
                self.assertEqual(f.read(), torch_bytes(torch.zeros(2, dtype=torch.int16)))
            with open(m.file("epoch.json")) as f:
                self.assertEqual(json.load(f), 1)
        c = os.path.join(self.tmp.name, "c.pt")
        torch.save({"encoder": {"w": torch.zeros(3)}}, c)
        mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
        try:
            r = run_ckptfs(a, c, mnt)
            self.assertEqual(r.returncode, 1)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn("'encoder/w' is in both", r.stderr)
            self.assertFalse(is_mounted(mnt))
        finally:
            os.rmdir(mnt)

    def test_renamed_sidecars_survive_the_merge(self):
        # In the first file, tensor "w.json" takes the name tensor w's sidecar would have had.
        a = os.path.join(self.tmp.name, "renamed.pt")
        b = os.path.join(self.tmp.name, "other.pt")
        sd_a = {"w": torch.arange(3.0), "w.json": torch.ones(2, dtype=torch.int16)}
        sd_b = {"v": torch.zeros(4, dtype=torch.float64)}
        torch.save(sd_a, a)
        torch.save(sd_b, b)
        with Mount(b, a) as m:  # the renamed file's tensors come second: their numbers move
            by_key = {e["key"][0]: e for e in m.index()["tensors"]}
            self.assertEqual(by_key["w"]["sidecar"], "w~1.json")
            self.assertEqual(sorted(os.listdir(m.path)),
                             [".ckptfs", "v", "v.json", "v.npy", "w", "w.json", "w.json.json", "w.json.npy",
                              "w.npy", "w~1.json"])
            for key, t in {**sd_a, **sd_b}.items():
                e = by_key[key]
                with open(m.file(e["path"]), "rb") as f:
                    self.assertEqual(f.read(), torch_bytes(t))
                with open(m.file(e["sidecar"])) as f:
                    self.assertEqual(json.load(f)["key"], [key])

    def test_a_sidecar_name_clashes_across_files(self):
        # "w.json" is tensor w's sidecar in one file and value w's file in the other: one of
        # them would be hidden, so the merge refuses, whichever file comes first.
        a = os.path.join(self.tmp.name, "tensor.pt")
        b = os.path.join(self.tmp.name, "value.pt")
        torch.save({"w": torch.ones(3)}, a)
        torch.save({"w": 5}, b)
        mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
        try:
            for order in ((a, b), (b, a)):
                r = run_ckptfs(*order, mnt)
                self.assertEqual(r.returncode, 1, order)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertIn("'w.json' is in both", r.stderr)
                self.assertFalse(is_mounted(mnt))
        finally:
            os.rmdir(mnt)

    def test_broken_indexes_fail_with_one_line(self):
        d = os.path.join(self.tmp.name, "broken")
        os.makedirs(d)
        good = self.indexes["bin"]
        with open(good) as f:
            index = json.load(f)
        for name in os.listdir(self.dirs["bin"]):
            if name.endswith(".bin"):
                os.link(os.path.join(self.dirs["bin"], name), os.path.join(d, name))
        cases = {
            "missing tensor": ({**index, "weight_map": {**index["weight_map"], "not.there": "pytorch_model-00001-of-00003.bin"}},
                               "puts tensor 'not.there'"),
            "wrong shard": ({**index, "weight_map": {**index["weight_map"], "model.ids": "pytorch_model-00003-of-00003.bin"}},
                            "puts tensor 'model.ids'"),
            "missing file": ({"weight_map": {"x": "nope.bin"}}, "nope.bin"),
            "path escape": ({"weight_map": {"x": "../a.pt"}}, "not a plain file name"),
            "no weight_map": ({"metadata": {}}, "weight_map"),
        }
        for what, (content, contains) in cases.items():
            with self.subTest(what):
                path = os.path.join(d, "pytorch_model.bin.index.json")
                with open(path, "w") as f:
                    json.dump(content, f)
                r = run_ckptfs("ls", path)
                self.assertEqual(r.returncode, 1, r.stdout)
                self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
                self.assertIn(contains, r.stderr)
        r = run_ckptfs("ls", self.tmp.name)  # a directory without an index
        self.assertEqual(r.returncode, 1)
        self.assertIn("no *.safetensors.index.json", r.stderr)

    def test_inspect_and_convert_take_an_index(self):
        r = run_ckptfs("info", self.dirs["safetensors"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("(3 files)", r.stdout)
        r = run_ckptfs("ls", self.indexes["bin"])
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"{len(self.expected)} tensors", r.stdout)
        out = os.path.join(self.tmp.name, "merged.safetensors")
        r = run_ckptfs("convert", self.indexes["bin"], out)
        self.assertEqual(r.returncode, 0, r.stderr)
        got, _ = read_safetensors(out)
        self.assertEqual({k: v[2] for k, v in got.items()}, self.expected)

    def test_hundred_shards_mount_quickly(self):
        d = os.path.join(self.tmp.name, "hundred")
        os.makedirs(d)
        g = torch.Generator().manual_seed(4)
        sd = {f"layer.{i}.{p}": torch.randn(64, generator=g) for i in range(100) for p in ("w", "b")}
        index = write_shards(d, sd, 100, "bin")
        start = time.monotonic()
        with Mount(index) as m:
            elapsed = time.monotonic() - start
            for k in ("layer.0.w", "layer.57.b", "layer.99.w"):
                with open(m.file(k), "rb") as f:
                    self.assertEqual(f.read(), torch_bytes(sd[k]), k)
            fds = len(os.listdir(f"/proc/{m.proc.pid}/fd"))
        print(f"\nshards: 100 .bin shards mounted in {elapsed:.2f} s; daemon holds {fds} fds", file=sys.stderr)
        self.assertLess(elapsed, 20, "mounting 100 shards should take seconds, not minutes")


if __name__ == "__main__":
    unittest.main()
