"""The real-world corpus in ../shared/corpus/real (checkpoints written by other people): every
zip, legacy and safetensors file mounts and every tensor is byte-exact against torch's recorded sha256; its
plain values read back from the .json files (issue #2)."""
import csv
import hashlib
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckptfs_testlib import Mount, require_fuse, run_ckptfs  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CORPUS = os.environ.get("CKPTFS_CORPUS", os.path.join(REPO, "..", "shared", "corpus", "real"))


def escape(part):
    """docs/layout.md's naming rule (without collision suffixes, which this corpus never needs)."""
    if isinstance(part, int):
        return str(part)
    if part == "":
        return "%empty"
    if part in (".", ".."):
        return part.replace(".", "%2E")
    return part.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")


# Attributes torch 1.13's nn.Module.__setstate__ adds while loading old pickled modules: they
# are in torch.load's result (and so in the truth) but not in the file ckptfs reads.
INJECTED_BY_TORCH = {"_is_full_backward_hook", "_non_persistent_buffers_set", "_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_backward_pre_hooks", "_forward_hooks_always_called"}


MISSING = object()


def read_value(root, path):
    """Finds a value by key path: directories while they exist, then the .json file, then on
    inside the JSON document (an opaque object's attributes sit under "state")."""
    here = root
    for i, part in enumerate(path):
        name = escape(part)
        if os.path.isdir(os.path.join(here, name)):
            here = os.path.join(here, name)
            continue
        leaf = os.path.join(here, name + ".json")
        if not os.path.exists(leaf):
            return MISSING
        with open(leaf) as f:
            doc = json.load(f)
        for rest in path[i + 1:]:
            if isinstance(doc, dict) and "__class__" in doc and "state" in doc:
                doc = doc["state"]
            if isinstance(doc, list) and isinstance(rest, int) and rest < len(doc):
                doc = doc[rest]
            elif isinstance(doc, dict) and str(rest) in doc:
                doc = doc[str(rest)]
            else:
                return MISSING
        return doc
    return MISSING


def manifest():
    with open(os.path.join(CORPUS, "MANIFEST.tsv")) as f:
        return list(csv.DictReader(f, delimiter="\t"))


class CorpusTest(unittest.TestCase):
    def test_torch_files_byte_exact(self):
        require_fuse()
        files = [r["file"] for r in manifest() if r["format"] in ("zip", "legacy", "safetensors")]
        self.assertGreaterEqual(len(files), 57)
        checked = quantized = values = 0
        opaque_calls = []
        for name in files:
            with self.subTest(file=name):
                with open(os.path.join(CORPUS, name + ".truth.json")) as f:
                    truth = json.load(f)
                with Mount(os.path.join(CORPUS, name)) as m:
                    index = {tuple(e["key"]): e for e in m.index()["tensors"]}
                    for t in truth["tensors"]:
                        key = tuple(t["path"])
                        if t["dtype"].startswith("q"):
                            # Quantized tensors are metadata only: a .json that says so.
                            rel = "/".join(escape(p) for p in key) + ".json"
                            with open(m.file(rel)) as f:
                                self.assertEqual(json.load(f)["kind"], "quantized tensor", rel)
                            quantized += 1
                            continue
                        self.assertIn(key, index, f"{name}: tensor {key} missing from index.json")
                        e = index[key]
                        self.assertEqual(e["dtype"], t["dtype"], key)
                        self.assertEqual(e["shape"], t["shape"], key)
                        with open(m.file(e["path"]), "rb") as f:
                            data = f.read()
                        self.assertEqual(len(data), t["nbytes"], key)
                        self.assertEqual(hashlib.sha256(data).hexdigest(), t["sha256"], f"{name}: {key} bytes differ")
                        checked += 1
                    for v in truth.get("values", []):
                        if v["type"] not in ("int", "float", "str", "bool", "NoneType", "torch.dtype"):
                            continue
                        got = read_value(m.path, v["path"])
                        if got is MISSING and v["path"][-1] in INJECTED_BY_TORCH:
                            continue
                        self.assertIsNot(got, MISSING, f"{name}: value {v['path']} not found")
                        if isinstance(got, dict) and set(got) <= {"__class__", "args", "state"} and \
                                not isinstance(v["value"], dict):
                            # A pickled call (e.g. _get_thnn_function_backend()): torch ran it to
                            # get this value; ckptfs executes nothing and shows the call instead.
                            opaque_calls.append((name, v["path"], got["__class__"]))
                            continue
                        self.assertEqual(got, v["value"], f"{name}: {v['path']}")
                        values += 1
        print(f"\ncorpus: {len(files)} zip, legacy and safetensors files, {checked} tensors byte-exact, {quantized} quantized "
              f"(metadata only), {values} values checked; {len(opaque_calls)} values are pickled calls ckptfs "
              f"shows unexecuted: {sorted(set(c[2] for c in opaque_calls))}", file=sys.stderr)
        self.assertLessEqual(len(opaque_calls), 10)
        self.assertGreater(checked, 1000)

    def test_other_formats_fail_cleanly(self):
        """Files this version does not serve yet get one clear line, never a crash or a mount."""
        import tempfile
        for r in manifest():
            if r["format"] in ("zip", "legacy", "safetensors"):
                continue
            with self.subTest(file=r["file"]):
                mnt = tempfile.mkdtemp(prefix="ckptfs-mnt-")
                try:
                    res = run_ckptfs(os.path.join(CORPUS, r["file"]), mnt)
                    self.assertNotEqual(res.returncode, 0)
                    self.assertEqual(len(res.stderr.strip().splitlines()), 1, res.stderr)
                    self.assertIn("TorchScript", res.stderr)
                finally:
                    os.rmdir(mnt)


if __name__ == "__main__":
    if not os.path.isdir(CORPUS):
        print(f"SKIPPED: the shared corpus is not at {CORPUS} (set CKPTFS_CORPUS)", file=sys.stderr)
        sys.exit(77)
    unittest.main()
