#!/usr/bin/python3
"""Run a model larger than the mount's memory budget: Linear layers that map their weights
from a ckptfs mount at forward time and let go of them afterwards.

    ckptfs model.pt /mnt/model --limit-mb 64
    examples/streamed_linear.py /mnt/model --check model.pt

The checkpoint is a state_dict of a torch.nn.Sequential of Linear layers (and activations):
keys "N.weight" / "N.bias". Each forward maps one layer's weight (numpy.memmap, no copy into
the process), multiplies, and drops the map; the daemon evicts what it served, so the memory
held for weights stays within --limit-mb however many layers there are. With --check, the
same input also runs through the model loaded in memory with torch.load, and the outputs
are compared with torch.allclose.
"""
import argparse
import json
import os
import resource
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class StreamedLinear(torch.nn.Module):
    def __init__(self, mount, prefix):
        super().__init__()
        self.files = {}
        for name in ("weight", "bias"):
            sidecar = os.path.join(mount, f"{prefix}.{name}.json")
            if os.path.exists(sidecar):
                with open(sidecar) as f:
                    side = json.load(f)
                self.files[name] = (os.path.join(mount, side["path"]), side["numpy_dtype"], tuple(side["shape"]))

    def mapped(self, name):
        if name not in self.files:
            return None
        path, dtype, shape = self.files[name]
        return torch.from_numpy(np.memmap(path, dtype=dtype, mode="r", shape=shape))

    def forward(self, x):
        w = self.mapped("weight")
        b = self.mapped("bias")
        y = torch.nn.functional.linear(x, w, b)
        del w, b  # the pages stay the kernel's until the daemon invalidates them
        return y


def streamed_model(mount):
    with open(os.path.join(mount, ".ckptfs", "index.json")) as f:
        keys = [e["path"] for e in json.load(f)["tensors"]]
    layers = sorted({int(k.split(".")[0]) for k in keys if k.endswith(".weight")})
    modules = []
    for i in layers:
        if modules:
            modules.append(torch.nn.ReLU())
        modules.append(StreamedLinear(mount, str(i)))
    return torch.nn.Sequential(*modules), layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mount")
    ap.add_argument("--check", metavar="CHECKPOINT", help="compare with the model loaded in memory")
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    model, layers = streamed_model(a.mount)
    with open(os.path.join(a.mount, "0.weight.json")) as f:
        in_features = json.load(f)["shape"][1]
    x = torch.randn(a.batch, in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    with open(os.path.join(a.mount, ".ckptfs", "stats")) as f:
        stats = json.load(f)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(layers)} streamed Linear layers, output {tuple(y.shape)}; peak RSS of this process "
          f"{peak_mib:.0f} MiB; mount held at most {stats['limit_bytes'] >> 20} MiB "
          f"({stats['invalidated_bytes'] >> 20} MiB invalidated)")
    if a.check:
        sd = torch.load(a.check)
        ref = torch.nn.Sequential()
        for n, i in enumerate(layers):
            w = sd[f"{i}.weight"]
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"{i}.bias" in sd)
            lin.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == str(i)})
            if n:
                ref.append(torch.nn.ReLU())
            ref.append(lin)
        with torch.no_grad():
            want = ref(x)
        ok = torch.allclose(y, want)
        print(f"allclose with the in-memory model: {ok}")
        raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
