"""Read an official IMM checkpoint without running anything from it.

The released files (lumalabs/imm: `cifar10.pt`, `imagenet256_ts_a2.pkl`, `imagenet256_s_a1.pkl`) are EDM's
network pickles: a dict `{'ema': IMMPrecond, ...}` where every network object of a class decorated with
EDM's `torch_utils.persistence.persistent_class` is stored as the call
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta holding the source code of the class's
whole module (`module_src`), the class name and the object's state (its `__dict__`: parameters, buffers,
submodules, attributes, and the constructor's arguments). `pickle.load` would `exec` that source; torch's
plain network modules (Linear, LayerNorm, ...) and timm's (PatchEmbed, Attention, Mlp) are stored as
ordinary class references, which `pickle.load` would import and call.

Here nothing of that runs. `read` unpickles with an allow-list (`pickle.Unpickler.find_class`):

- admitted, as the real thing: the containers (collections.OrderedDict, set, frozenset), torch's dtypes and
  our own versions of the functions that rebuild tensors and parameters (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_parameter`, `torch.storage._load_from_bytes`) and NumPy arrays, dtypes and scalars of plain
  numeric types, which only check their arguments and view bytes as numbers;
- `_reconstruct_persistent_obj(meta)` becomes a Persistent record: the class name, the object's state and the
  sha256 of the embedded source, which is never executed;
- every other global (a torch or timm module class, `os.system`, anything) becomes an inert Stub class: calling
  or instantiating it records its arguments, `__setstate__` records the state, nothing of the named object is
  imported or run.

The storages of the tensors are parsed here too: a plain pickle holds each storage as a legacy `torch.save`
blob (`torch.storage._load_from_bytes`: magic number, protocol, system info, the storage's persistent id, its
key list, then the raw bytes); a `torch.save` zip file holds them as `archive/data/<key>` entries, read by
`persistent_load` (torch.load's weights_only semantics: tensors and containers, nothing else constructed). A
legacy (non-zip) `torch.save` file is read the same way. Tensors view the file's bytes without a copy where
they can, so a file takes about its own size in memory.

What cannot be read that way (not a pickle or torch file, a truncated one, a storage that does not fit) is
CheckpointError, one sentence naming the file.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imm.errors import CheckpointError

PERSISTENCE = ("torch_utils.persistence", "_reconstruct_persistent_obj")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER of the legacy format
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
TORCH_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}
NUMPY_KINDS = "biufc"  # bool, signed, unsigned, float, complex: dtypes that are only numbers


class Stub:
    """What an unadmitted global becomes: a class whose calls and instances only record their arguments
    (`args`, `kwargs`), the state BUILD gives them (`state`) and the items APPEND/SETITEM add; `qualname` is
    the global the file named. Nothing of the named object is imported or run."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.entries = args, kwargs, None, [], []
        return obj

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items if isinstance(items, (list, tuple)) else [])

    def __setitem__(self, key, value):
        self.entries.append((key, value))

    def __repr__(self) -> str:
        return f"<{self.qualname} (not constructed)>"


@dataclass
class Persistent:
    """An object of an EDM persistent class, as the file records it: never constructed, its source never run."""

    class_name: str
    state: dict
    source_sha256: str | None
    source_chars: int
    version: Any = None

    qualname = property(lambda self: self.class_name)

    def __repr__(self) -> str:
        return f"<persistent {self.class_name} (source sha256 {str(self.source_sha256)[:12]}, not run)>"


@dataclass
class _StorageRef:
    dtype: torch.dtype
    numel: int
    flat: torch.Tensor | None = None  # 1-D, numel elements of dtype


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


class _NumpyArray(Stub):
    """numpy.core.multiarray._reconstruct(...) + BUILD: turned into an array of a numeric dtype in _finish."""

    qualname = "numpy.ndarray"


class _NumpyDtype(Stub):
    qualname = "numpy.dtype"


@dataclass
class Checkpoint:
    """What `read` found: the unpickled top-level object (dicts, lists, tensors, Persistent and Stub records),
    the file's format and sha256, and the persistent classes it holds with the hashes of their sources."""

    path: Path
    format: str  # "pickle" | "torch.save (zip)" | "torch.save (legacy)"
    sha256: str
    size: int
    obj: Any
    sources: dict[str, str] = field(default_factory=dict)  # persistent class name -> source sha256
    stubs: list[str] = field(default_factory=list)  # the other globals the file named (never imported)


class _Reader(pickle._Unpickler):
    """The allow-list unpickler (module docstring). Python's own unpickler, so that BUILD, APPEND(S) and
    SETITEM(S) can be held to the records and containers made here: a BUILD on anything but a Stub, or an
    item set on anything but a dict, list or Stub, is refused (the C unpickler would call the object's
    __setstate__ or __setitem__, e.g. a tensor's)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, Stub):
            raise pickle.UnpicklingError(f"the file sets the state of a {type(inst).__name__}")
        inst.__setstate__(state)

    def load_append(self):
        value = self.stack.pop()
        self._container(self.stack[-1], (list, Stub)).append(value)

    def load_appends(self):
        items = self.pop_mark()
        target = self._container(self.stack[-1], (list, Stub))
        for item in items:
            target.append(item)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(self.stack[-1], (dict, Stub))[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._container(self.stack[-1], (dict, Stub))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    @staticmethod
    def _container(obj, kinds):
        if not isinstance(obj, kinds):
            raise pickle.UnpicklingError(f"the file adds items to a {type(obj).__name__}")
        return obj

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def __init__(self, file, *, ctx: "_Context", storages=None, preallocate: bool = False):
        super().__init__(file)
        self.ctx = ctx
        self.storages = storages  # None: a persistent id is refused (a plain pickle has none)
        self.preallocate = preallocate

    def find_class(self, module: str, name: str):
        return self.ctx.resolve(module, name)

    def persistent_load(self, pid):
        if self.storages is not None and isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            return pid[1]  # legacy torch.save: a module's class (whatever find_class made of it), source unused
        if self.storages is None or not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {type(pid).__name__}")
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views of the legacy format are not supported")
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {pid[:5]!r}")
        key = str(key)
        if key not in self.storages:
            ref = _StorageRef(storage_type.dtype, numel)
            if self.preallocate:
                ref.flat = torch.empty(numel, dtype=storage_type.dtype)
            self.storages[key] = ref
        return self.storages[key]


class _Context:
    """What one read shares: the stub classes made so far, the persistent classes seen, the zip archive."""

    def __init__(self):
        self.stub_classes: dict[str, type] = {}
        self.sources: dict[str, str] = {}
        self.zip_reader = None  # (ZipFile, prefix) while reading a torch.save zip

    # -- the allow-list -------------------------------------------------------------------------------
    def resolve(self, module: str, name: str):
        qual = f"{module}.{name}"
        if (module, name) == PERSISTENCE:
            return self.persistent
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch.storage" and name == "_load_from_bytes":
            return self.load_from_bytes
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        if module == "torch" and name == "Size":
            return _size
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return {"set": _set, "frozenset": _frozenset}[name]
        if module == "_codecs" and name == "encode":
            return _latin1
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _NumpyArray
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numpy_scalar
        if module == "numpy" and name == "dtype":
            return _NumpyDtype
        if module == "numpy" and name == "ndarray":
            return _NumpyArray
        return self.stub(qual)

    def stub(self, qual: str) -> type:
        if qual not in self.stub_classes:
            self.stub_classes[qual] = type(qual.rsplit(".", 1)[-1], (Stub,), {"qualname": qual})
        return self.stub_classes[qual]

    # -- EDM's persistent objects ----------------------------------------------------------------------
    def persistent(self, meta=None, *rest):
        if rest or not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
            raise pickle.UnpicklingError("a persistent object without its record (type, class_name, state)")
        if meta.get("type", "class") != "class":
            raise pickle.UnpicklingError(f"a persistent object of type {meta.get('type')!r}")
        src = meta.get("module_src")
        digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest() if isinstance(src, str) else None
        state = meta.get("state")
        obj = Persistent(
            class_name=meta["class_name"],
            state=dict(state) if isinstance(state, dict) else {},
            source_sha256=digest,
            source_chars=len(src) if isinstance(src, str) else 0,
            version=meta.get("version"),
        )
        self.sources.setdefault(obj.class_name, digest)
        return obj

    # -- storages ---------------------------------------------------------------------------------------
    def load_from_bytes(self, blob=None, *rest):
        """torch.storage._load_from_bytes: one storage saved in the legacy format, viewed without a copy."""
        if rest or not isinstance(blob, (bytes, bytearray)):
            raise pickle.UnpicklingError("_load_from_bytes without its bytes")
        obj = _read_legacy(io.BytesIO(blob), self, buffer=blob)
        if not isinstance(obj, _StorageRef):
            raise pickle.UnpicklingError("_load_from_bytes holding something else than a storage")
        return obj


# -- the admitted functions: check their arguments, build numbers and containers, nothing else --------------
def _rebuild_tensor(storage=None, offset=0, size=(), stride=(), requires_grad=False, *rest):
    if not isinstance(storage, _StorageRef) or storage.flat is None:
        raise pickle.UnpicklingError("a tensor without its storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError(f"a malformed tensor record (offset {offset!r}, size {size}, stride {stride})")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if extent > storage.numel or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(
            f"a tensor of size {list(size)} reaches past its storage of {storage.numel} elements"
        )
    return storage.flat.as_strided(size, stride, offset)


def _rebuild_parameter(data=None, requires_grad=False, hooks=None, *rest):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without its tensor")
    return data


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"a tensor {what} that is not a tuple of integers")
    return tuple(values)


def _size(values=()):
    return _ints(values, "size")


def _ordered_dict(items=()):
    from collections import OrderedDict

    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError("an OrderedDict of something else than pairs")
    return OrderedDict(items)


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError("a set of something else than a list")
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


def _latin1(text=None, encoding="latin1", *rest):
    """_codecs.encode as protocol-2 pickles use it for bytes: a str in latin-1, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode of something else than latin-1 text")
    return text.encode("latin1")


def _numpy_dtype(d) -> np.dtype:
    if isinstance(d, np.dtype):
        return d
    if not isinstance(d, _NumpyDtype) or not d.args or not isinstance(d.args[0], str):
        raise pickle.UnpicklingError("a NumPy value without a plain dtype")
    dtype = np.dtype(d.args[0])
    if dtype.kind not in NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"a NumPy dtype {d.args[0]!r} that is not a plain number")
    order = d.state[1] if isinstance(d.state, tuple) and len(d.state) > 1 else "="
    return dtype.newbyteorder(order) if order in "<>" else dtype


def _numpy_scalar(dtype=None, data=None, *rest):
    dtype = _numpy_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("a NumPy scalar whose bytes do not fit its dtype")
    return np.frombuffer(data, dtype)[0]


def _numpy_array(stub: _NumpyArray):
    state = stub.state
    if not isinstance(state, tuple) or len(state) != 5:
        raise pickle.UnpicklingError("a NumPy array without its state")
    _version, shape, dtype, fortran, raw = state
    dtype = _numpy_dtype(dtype)
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(shape, tuple):
        raise pickle.UnpicklingError("a NumPy array whose data are not bytes")
    n = int(np.prod(shape)) if shape else 1
    if n * dtype.itemsize != len(raw):
        raise pickle.UnpicklingError(f"a NumPy array of shape {shape} whose bytes do not fit it")
    return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def _finish(obj, seen=None):
    """Replace NumPy array records by arrays, in place through containers and recorded states."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, _NumpyArray):
        return _numpy_array(obj)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _finish(obj[k], seen)
    elif isinstance(obj, list):
        obj[:] = [_finish(v, seen) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(_finish(v, seen) for v in obj)
    elif isinstance(obj, Persistent):
        obj.state = _finish(obj.state, seen)
    elif isinstance(obj, Stub):
        obj.state = _finish(obj.state, seen)
        obj.args = tuple(_finish(v, seen) for v in obj.args)
    return obj


# -- the three file formats ------------------------------------------------------------------------------
def _read_legacy(f, ctx: _Context, *, buffer=None):
    """A legacy torch.save stream: magic, protocol, system info, the object, its storage keys, the raw bytes.
    With `buffer` (the whole stream in memory) the storages view it; else they are read into fresh tensors."""
    magic = _Reader(f, ctx=ctx).load()
    if magic != LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a torch.save stream (no magic number)")
    protocol = _Reader(f, ctx=ctx).load()
    if protocol != LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f"legacy torch.save protocol {protocol!r}")
    sys_info = _Reader(f, ctx=ctx).load()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise pickle.UnpicklingError("a big-endian torch.save stream")
    storages: dict[str, _StorageRef] = {}
    obj = _Reader(f, ctx=ctx, storages=storages, preallocate=buffer is None).load()
    keys = _Reader(f, ctx=ctx).load()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise pickle.UnpicklingError("the storage keys do not match the storages the object names")
    for key in keys:
        ref = storages[str(key)]
        head = f.read(8)
        if len(head) != 8:
            raise EOFError("the file ends before its storages")
        (numel,) = struct.unpack("<q", head)
        nbytes = numel * ref.dtype.itemsize
        if numel != ref.numel:
            raise pickle.UnpicklingError(f"storage {key} holds {numel} elements, not the {ref.numel} recorded")
        if buffer is not None:
            start = f.tell()
            if start + nbytes > len(buffer):
                raise EOFError("the file ends inside a storage")
            ref.flat = _view(buffer, ref.dtype, numel, start)
            f.seek(start + nbytes)
        else:
            view = ref.flat.view(torch.uint8).numpy() if nbytes else b""
            if nbytes and f.readinto(memoryview(view)) != nbytes:
                raise EOFError("the file ends inside a storage")
    return obj


def _view(buffer, dtype: torch.dtype, numel: int, offset: int) -> torch.Tensor:
    """numel elements of dtype at `offset` of an in-memory buffer, without a copy."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # a bytes object is not writable; these tensors are only read
        warnings.simplefilter("ignore")
        return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=offset)


def _read_zip(path: Path, ctx: _Context):
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1:
            raise pickle.UnpicklingError("a zip file without torch.save's data.pkl")
        prefix = names[0][: -len("data.pkl")]
        storages: dict[str, _StorageRef] = {}

        class ZipReader(_Reader):
            def persistent_load(self, pid):
                ref = super().persistent_load(pid)
                if ref.flat is None:
                    try:
                        data = archive.read(f"{prefix}data/{pid[2]}")
                    except KeyError:
                        raise pickle.UnpicklingError(f"storage {pid[2]} is missing from the archive") from None
                    if len(data) < ref.numel * ref.dtype.itemsize:
                        raise pickle.UnpicklingError(f"storage {pid[2]} is shorter than its {ref.numel} elements")
                    ref.flat = _view(data, ref.dtype, ref.numel, 0)
                return ref

        with archive.open(names[0]) as f:
            return ZipReader(f, ctx=ctx, storages=storages).load()


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _what(head: bytes) -> str:
    if not head:
        return "it is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy file"
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip file"
    if head.startswith(b"\x80"):
        return "it is a Python pickle"
    return f"it begins {head[:12]!r}"


def read(path) -> Checkpoint:
    """Read `path` (a pickle, a torch.save zip or a legacy torch.save file) with the allow-list: the top-level
    object with tensors, containers and Persistent/Stub records. Nothing from the file is imported or run.
    A file that cannot be read so: CheckpointError, one sentence."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; give the official checkpoint's path.")
    with open(path, "rb") as f:
        head = f.read(16)
    ctx = _Context()
    try:
        if head.startswith(b"PK\x03\x04"):
            fmt, obj = "torch.save (zip)", _read_zip(path, ctx)
        elif head.startswith(b"\x80"):
            with open(path, "rb") as f:
                first = _Reader(f, ctx=ctx).load() if _is_legacy(head) else None
                f.seek(0)
                if first == LEGACY_MAGIC:
                    fmt, obj = "torch.save (legacy)", _read_legacy(f, ctx)
                else:
                    fmt, obj = "pickle", _Reader(f, ctx=ctx).load()
        else:
            raise CheckpointError(
                f"{path} is not an official IMM checkpoint: {_what(head)}, not a pickle or torch.save file."
            )
        obj = _finish(obj)
    except CheckpointError:
        raise
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path} is truncated or damaged ({_what(head)} that ends early: {type(e).__name__}); copy it again."
        ) from None
    except MemoryError:
        raise CheckpointError(f"{path} does not fit in this machine's memory.") from None
    except Exception as e:  # noqa: BLE001  pickle's many errors on a damaged or foreign stream
        detail = str(e).splitlines()[0].rstrip(".") if str(e) else ""
        truncated = any(w in detail.lower() for w in ("truncated", "ran out of input", "exhausted"))
        why = "is truncated or damaged" if truncated else "cannot be read as an official IMM checkpoint"
        raise CheckpointError(
            f"{path} {why} ({_what(head)}; {type(e).__name__}{': ' + detail if detail else ''})."
        ) from None
    return Checkpoint(
        path=path,
        format=fmt,
        sha256=file_sha256(path),
        size=path.stat().st_size,
        obj=obj,
        sources=dict(ctx.sources),
        stubs=sorted(ctx.stub_classes),
    )


def _is_legacy(head: bytes) -> bool:
    """A legacy torch.save stream starts with the pickled magic number (protocol 2: PROTO 2, LONG1 10 bytes)."""
    return head[2:4] == b"\x8a\x0a"


# -- the records as modules --------------------------------------------------------------------------------
def attributes(obj) -> dict:
    """The recorded `__dict__` of a Persistent or Stub record ({} for anything else)."""
    state = getattr(obj, "state", None)
    if isinstance(obj, Stub) and isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]  # (dict, slots) states
    return state if isinstance(obj, (Persistent, Stub)) and isinstance(state, dict) else {}


def class_name(obj) -> str:
    """`DiT`, `SongUNet` (a persistent class), `torch.nn.modules.linear.Linear` (another global), or the type."""
    return obj.qualname if isinstance(obj, (Persistent, Stub)) else type(obj).__name__


def submodules(obj) -> dict:
    """A module record's `_modules` (name -> record; None entries dropped)."""
    mods = attributes(obj).get("_modules") or {}
    return {k: v for k, v in mods.items() if v is not None} if isinstance(mods, dict) else {}


def module_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """What `state_dict()` of the module the record describes would hold: its parameters and persistent
    buffers, then each submodule's under `name.`, in their order."""
    attrs = attributes(obj)
    out: dict[str, torch.Tensor] = {}
    skip = attrs.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (attrs.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = value
    for name, sub in submodules(obj).items():
        out.update(module_tensors(sub, f"{prefix}{name}."))
    return out
