#!/usr/bin/python3
"""Fill a torch module from a ckptfs mount, tensor by tensor: what ckpt-streamer's
apply_state_dict does, without mmap tricks in the process. Each parameter is copied from its
file straight into the module's own storage; only one tensor is in flight at a time, and the
mount's memory stays within its --limit-mb.

    ckptfs model.pt /mnt/model --limit-mb 64
    examples/load_state_dict.py /mnt/model --check model.pt

The demo architecture is a Sequential of Linear layers read from the mount's index; in your
code, build your own model and call load_from_mount(model, "/mnt/model").
"""
import argparse
import json
import os
import resource

import numpy as np
import torch


def load_from_mount(module, mount, prefix=""):
    """Copies every entry of module.state_dict() from mount/PREFIX<name>; returns the names."""
    with open(os.path.join(mount, ".ckptfs", "index.json")) as f:
        index = {e["path"]: e for e in json.load(f)["tensors"]}
    loaded = []
    with torch.no_grad():
        for name, target in module.state_dict(keep_vars=True).items():
            e = index[prefix + name]
            if list(target.shape) != e["shape"]:
                raise ValueError(f"{name}: shape {list(target.shape)} in the model, {e['shape']} in the mount")
            raw = np.fromfile(os.path.join(mount, e["path"]), dtype=np.uint8)  # one read() of the file
            src = torch.from_numpy(raw).view(target.dtype).reshape(target.shape)
            target.copy_(src)
            loaded.append(name)
    return loaded


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mount")
    ap.add_argument("--check", metavar="CHECKPOINT", help="compare every tensor with torch.load")
    a = ap.parse_args()
    with open(os.path.join(a.mount, ".ckptfs", "index.json")) as f:
        shapes = {e["path"]: e["shape"] for e in json.load(f)["tensors"]}
    layers = sorted({int(k.split(".")[0]) for k in shapes if k.endswith(".weight")})
    # Linear layers where the checkpoint has weights, activations (no parameters) between them.
    model = torch.nn.Sequential(*[
        torch.nn.Linear(shapes[f"{i}.weight"][1], shapes[f"{i}.weight"][0]) if i in layers else torch.nn.ReLU()
        for i in range(max(layers) + 1)
    ])
    names = load_from_mount(model, a.mount)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"loaded {len(names)} tensors into the model; peak RSS of this process {peak_mib:.0f} MiB")
    if a.check:
        want = torch.load(a.check)
        got = model.state_dict()
        same = all(torch.equal(got[k], want[k]) for k in got)
        print(f"equal to torch.load: {same}")
        raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
