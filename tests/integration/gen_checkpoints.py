#!/usr/bin/python3
"""Writes the integration-test checkpoints with the real torch.save.

usage: gen_checkpoints.py OUTDIR [NAME ...]

Each case exercises one part of issue #2: every dtype, views, a Lightning-style nested
checkpoint, a whole pickled nn.Module, many small tensors, awkward key names, a bare tensor at
the root, and pickle protocol 4.
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

torch.manual_seed(1234)


def dtypes():
    g = torch.Generator().manual_seed(7)
    out = {}
    for dt in [torch.float32, torch.float16, torch.float64, torch.bfloat16]:
        out[str(dt).replace("torch.", "")] = torch.randn(5, 7, generator=g).to(dt)
    for dt in [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]:
        info = torch.iinfo(dt)
        out[str(dt).replace("torch.", "")] = torch.randint(info.min, info.max, (6, 3), dtype=dt, generator=g)
    out["bool"] = torch.randn(4, 4, generator=g) > 0
    out["complex64"] = torch.randn(3, 2, dtype=torch.complex64, generator=g)
    out["complex128"] = torch.randn(2, 3, dtype=torch.complex128, generator=g)
    out["float32_special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    return out


def views():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    bf = torch.arange(40, dtype=torch.float32).to(torch.bfloat16).reshape(5, 8)
    img = torch.randn(2, 3, 4, 5)
    return {
        "base": base,
        "offset_slice": base[2:4],              # storage offset
        "row_tail": base[3, 4:],                # offset, 1-D
        "transposed": base.t(),                 # stride (1, 10)
        "stepped": base[:, ::3],                # stride (10, 3)
        "column": base[:, 7],                   # stride (10,)
        "expanded": torch.arange(4, dtype=torch.int32).expand(3, 4),     # stride 0
        "expanded_inner": torch.arange(3, dtype=torch.int64)[:, None].expand(3, 5),
        "scalar": torch.tensor(3.5),            # 0-dim
        "scalar_int": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0, 3),             # zero-size
        "empty_view": base[:, 5:5],
        "channels_last": img.contiguous(memory_format=torch.channels_last),
        "permuted": img.permute(3, 1, 0, 2),
        "overlap": torch.arange(10, dtype=torch.int16).as_strided((4, 3), (2, 1)),
        "bf16_slice": bf[1:, ::2],
        "shared_a": base.view(60)[10:20],       # several views of one storage
        "shared_b": base.view(3, 20)[1],
        "narrow_complex": torch.randn(4, 4, dtype=torch.complex64)[:, 1:3],
    }


def lightning():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4),
                                torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randn(5, 8)).pow(2).sum()
    loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    ns = argparse.Namespace(lr=1e-3, layers=[8, 16, 4], name="mlp", dropout=None)
    return {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.9.0",
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],      # int keys under "state"
        "lr_schedulers": [sched.state_dict()],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "/runs/exp1/epoch=3.ckpt",
                "best_k_models": {"/runs/exp1/epoch=3.ckpt": torch.tensor(0.25)},
            }
        },
        "hyper_parameters": {"lr": 1e-3, "batch_size": 32, "betas": (0.9, 0.999), "args": ns,
                             "unicode": "gr\u00fc\u00dfe \u2603", "big": 2**70, "neg": -5},
    }


def module():
    import ckptfs_test_models
    return ckptfs_test_models.Net()


def many():
    g = torch.Generator().manual_seed(3)
    return collections.OrderedDict((f"layer.{i}.weight", torch.randn(4, generator=g)) for i in range(5000))


def names():
    t = lambda v: torch.full((2,), float(v))  # noqa: E731
    return {
        "a/b": t(1), "100%": t(2), "": t(3), ".": t(4), "..": t(5),
        "w": t(6), "w.json": t(7), 3: t(8), "3": t(9),
        "x" * 300: t(10), "\u00e9t\u00e9/\u2603" * 40: t(11),
        "dir": {"w": t(12), "w.json": "a string, not the sidecar"},
        ".ckptfs": t(13),
        # Only the view steps aside: v's .npy becomes v~1.npy, its sidecar stays v.json.
        "v.npy": t(14), "v": t(15),
    }


class RebuildV1:
    """Pickles a tensor the pre-0.4 way, as torch._utils._rebuild_tensor(storage, offset, size,
    stride): real torch.save writes the GLOBAL and the storage's persistent id; torch.load
    rebuilds it."""

    def __init__(self, t):
        self.t = t

    def __reduce_ex__(self, proto):
        t = self.t
        return (torch._utils._rebuild_tensor, (t.storage(), t.storage_offset(), tuple(t.size()), t.stride()))


def rebuild_v1():
    x = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    return {"v1": RebuildV1(x), "v1_t": RebuildV1(x.t()), "v1_slice": RebuildV1(x[1:, 2:5]), "v2": x}


def values():
    import numpy as np
    import ckptfs_test_models
    return {
        "np_f64": np.float64(0.5), "np_f32": np.float32(1.25), "np_f16": np.float16(-0.5),
        "np_i64": np.int64(-3), "np_u8": np.uint8(200), "np_bool": np.bool_(True),
        "np_c64": np.complex64(1 + 2j),
        "np_array": np.array([[1, 2], [3, 4]], dtype=np.int32),
        "np_fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "np_big_endian": np.arange(3, dtype=">i4"),
        "size": torch.Size([2, 3]), "device": torch.device("cuda", 1), "dtype": torch.float16,
        "hparams": ckptfs_test_models.AttributeDict(lr=0.1, w=torch.ones(3), name="net"),
    }


CASES = {
    "dtypes": (dtypes, {}),
    "views": (views, {}),
    "lightning": (lightning, {}),
    "module": (module, {}),
    "many": (many, {}),
    "names": (names, {}),
    "root_tensor": (lambda: torch.arange(10, dtype=torch.float64).reshape(2, 5).t(), {}),
    "protocol4": (lambda: {"a": torch.randn(3, 3), "b": [torch.ones(2, dtype=torch.int8), {"c": 1.5}]},
                  {"pickle_protocol": 4}),
    "rebuild_v1": (rebuild_v1, {}),
    "values": (values, {}),
    # The legacy (pre-1.6) stream, written by today's torch on request.
    "legacy_views": (views, {"_use_new_zipfile_serialization": False}),
    "legacy_lightning": (lightning, {"_use_new_zipfile_serialization": False}),
    "legacy_module": (module, {"_use_new_zipfile_serialization": False}),
    "legacy_protocol4": (lambda: {"a": torch.randn(3, 3), "b": [torch.ones(2, dtype=torch.int8)]},
                         {"_use_new_zipfile_serialization": False, "pickle_protocol": 4}),
    "parameters": (lambda: {"p": torch.nn.Parameter(torch.randn(3, 2)), "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False)}, {}),
}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("names", nargs="*")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    for name in a.names or CASES:
        make, kwargs = CASES[name]
        obj = make()
        torch.save(obj, os.path.join(a.outdir, name + ".pt"), **kwargs)


def write(outdir, name):
    """Writes one case and returns its path (for tests that import this module)."""
    make, kwargs = CASES[name]
    path = os.path.join(outdir, name + ".pt")
    torch.save(make(), path, **kwargs)
    return path


if __name__ == "__main__":
    main()
