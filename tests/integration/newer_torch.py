"""Writes checkpoints the way newer torch (2.x) does, for constructs torch 1.13 cannot write:
_rebuild_tensor_v3 with new dtypes over UntypedStorage, _rebuild_parameter_with_state,
_rebuild_from_type_v2 subclasses, conj/neg metadata, sparse tensors.

The pickle is produced by CPython's pickle.Pickler exactly as torch.save produces it: a
persistent_id hook turns storages into ('storage', storage_type, key, location, numel) and
every call is a REDUCE of a GLOBAL. Callables this torch lacks are stand-ins that carry the
real module and name (pickle writes GLOBALs by name only), installed just while pickling.
The zip holds data.pkl, data/<key>, version and byteorder like torch.save's."""
import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import torch


class Storage:
    def __init__(self, key, storage_class, raw, numel):
        self.key, self.storage_class, self.raw, self.numel = key, storage_class, raw, numel


class Call:
    """Pickles as REDUCE(GLOBAL module.name, args)."""

    def __init__(self, qualified, *args):
        self.qualified, self.args = qualified, args

    def __reduce__(self):
        return (stand_in(self.qualified), self.args)


class Ref:
    """Pickles as a bare GLOBAL (a dtype, a class)."""

    def __init__(self, qualified):
        self.qualified = qualified


_stand_ins = {}


def stand_in(qualified):
    if qualified not in _stand_ins:
        module, _, name = qualified.rpartition(".")

        def f(*a):
            raise RuntimeError("stand-in, never called")
        f.__module__, f.__name__, f.__qualname__ = module, name, name
        _stand_ins[qualified] = f
    return _stand_ins[qualified]


@contextlib.contextmanager
def installed():
    """Makes every stand-in findable under its name while pickling, then removes it."""
    added = []
    for qualified, f in _stand_ins.items():
        module, _, name = qualified.rpartition(".")
        if module not in sys.modules:
            sys.modules[module] = types.ModuleType(module)
            added.append((module, None))
        mod = sys.modules[module]
        added.append((module, (name, getattr(mod, name, None), hasattr(mod, name))))
        setattr(mod, name, f)
    try:
        yield
    finally:
        for module, restore in reversed(added):
            if restore is None:
                del sys.modules[module]
                continue
            name, old, had = restore
            if had:
                setattr(sys.modules[module], name, old)
            else:
                delattr(sys.modules[module], name)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
        return None


def _resolve_refs(obj):
    """Replaces Ref markers by their stand-in functions (pickled as GLOBALs)."""
    if isinstance(obj, Ref):
        return stand_in(obj.qualified)
    if isinstance(obj, Call):
        stand_in(obj.qualified)  # created before pickling, so installed() provides it
        obj.args = tuple(_resolve_refs(a) for a in obj.args)
        return obj
    if isinstance(obj, tuple):
        return tuple(_resolve_refs(a) for a in obj)
    if isinstance(obj, list):
        return [_resolve_refs(a) for a in obj]
    if isinstance(obj, dict):
        return type(obj)((k, _resolve_refs(v)) for k, v in obj.items())
    return obj


def save(obj, storages, path):
    obj = _resolve_refs(obj)
    buf = io.BytesIO()
    with installed():
        _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.raw)
        z.writestr("archive/version", "3\n")


def v2(storage, offset, size, stride, metadata=None):
    args = [storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict()]
    if metadata is not None:
        args.append(metadata)
    return Call("torch._utils._rebuild_tensor_v2", *args)


def v3(storage, offset, size, stride, dtype):
    return Call("torch._utils._rebuild_tensor_v3", storage, offset, tuple(size), tuple(stride), False,
                collections.OrderedDict(), Ref(f"torch.{dtype}"))


UNTYPED = torch.UntypedStorage
