"""imm.official.reader: EDM's persistence format read with an allow-list, nothing from the file run.

The safety test builds a file that would run code twice over when `pickle.load`ed: an EDM persistent object
whose embedded module source calls os.system (EDM's `_reconstruct_persistent_obj` would `exec` it), and a
plain pickle call of os.system in its opcodes. The reader imports its tensors and neither marker file appears;
a control shows that `pickle.load` of the same file does write the opcode's marker.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from imm.errors import CheckpointError
from imm.official import reader

PERSISTENCE_MODULE = "torch_utils.persistence"


class _Call:
    """Pickles as `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture
def fake_persistence(monkeypatch):
    """A stand-in `torch_utils.persistence` module, so a test file names the global EDM's files name."""
    package = types.ModuleType("torch_utils")
    module = types.ModuleType(PERSISTENCE_MODULE)

    def _reconstruct_persistent_obj(meta):  # never called: only its name is pickled
        raise AssertionError("the reader must not call the file's reconstruct function")

    _reconstruct_persistent_obj.__module__ = PERSISTENCE_MODULE
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, PERSISTENCE_MODULE, module)
    return _reconstruct_persistent_obj


def persistent(reconstruct, class_name: str, source: str, state: dict) -> _Call:
    meta = dict(type="class", version=6, module_src=source, class_name=class_name, state=state)
    return _Call(reconstruct, meta)


def module_state(params: dict, modules: dict | None = None) -> dict:
    return {"training": False, "_parameters": dict(params), "_buffers": {}, "_modules": dict(modules or {})}


def malicious_payload(reconstruct, marker_src, marker_op) -> dict:
    """{'ema': a persistent net whose source writes marker_src, 'evil': os.system writing marker_op}."""
    import os

    source = f"import os\nos.system('touch {marker_src}')\nclass Net:\n    pass\n"
    weight = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    inner = torch.nn.Linear(3, 2)  # a plain torch module: a global the reader only records
    net = persistent(reconstruct, "Net", source, module_state({"weight": weight}, {"fc": inner}))
    return {"ema": net, "evil": _Call(os.system, f"touch {marker_op}")}


@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
def test_malicious_file_imports_tensors_and_runs_nothing(tmp_path, fake_persistence, fmt):
    marker_src, marker_op = tmp_path / "marker_source", tmp_path / "marker_opcode"
    payload = malicious_payload(fake_persistence, marker_src, marker_op)
    path = tmp_path / ("evil.pkl" if fmt == "pickle" else "evil.pt")
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)

    ckpt = reader.read(path)

    assert not marker_src.exists() and not marker_op.exists()
    net = ckpt.obj["ema"]
    assert isinstance(net, reader.Persistent) and net.class_name == "Net"
    assert net.source_sha256 and ckpt.sources == {"Net": net.source_sha256}
    tensors = reader.module_tensors(net)
    assert sorted(tensors) == ["fc.bias", "fc.weight", "weight"]
    assert torch.equal(tensors["weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert torch.equal(tensors["fc.weight"], payload["ema"].args[0]["state"]["_modules"]["fc"].weight.detach())
    evil = ckpt.obj["evil"]
    assert isinstance(evil, reader.Stub) and evil.qualname == "posix.system" and evil.args == (f"touch {marker_op}",)
    assert "posix.system" in ckpt.stubs and "torch.nn.modules.linear.Linear" in ckpt.stubs
    assert not marker_src.exists() and not marker_op.exists()


def test_control_plain_pickle_load_runs_the_opcode(tmp_path, fake_persistence):
    """The same file is really dangerous: pickle.load (in a child process) calls os.system."""
    marker_src, marker_op = tmp_path / "marker_source", tmp_path / "marker_opcode"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"evil": malicious_payload(fake_persistence, marker_src, marker_op)["evil"]}))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"], check=True)
    assert marker_op.exists()


def test_build_and_setitem_only_on_records(tmp_path):
    """A BUILD (a __setstate__ call) on a tensor, or items set on one, is refused: only records and containers."""
    t = pickle.dumps(torch.zeros(3))
    # ... + EMPTY_DICT + BUILD: set the tensor's state; strip the STOP first
    build = t[:-1] + b"}" + pickle.BUILD + pickle.STOP
    setitem = t[:-1] + pickle.BININT1 + b"\x00" + pickle.BININT1 + b"\x07" + pickle.SETITEM + pickle.STOP
    for name, blob in (("build", build), ("setitem", setitem)):
        p = tmp_path / f"{name}.pkl"
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match="cannot be read"):
            reader.read(p)


def test_numpy_values_and_dtypes(tmp_path):
    path = tmp_path / "np.pkl"
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    path.write_bytes(pickle.dumps({"a": arr, "s": np.sqrt(np.float64(0.5)), "i": np.int64(3), "d": torch.float32}))
    obj = reader.read(path).obj
    assert np.array_equal(obj["a"], arr) and obj["a"].dtype == np.float32
    assert obj["s"] == np.sqrt(0.5) and obj["i"] == 3 and obj["d"] is torch.float32
    objects = tmp_path / "obj.pkl"
    objects.write_bytes(pickle.dumps(np.array([{"x": 1}], dtype=object)))
    with pytest.raises(CheckpointError, match="cannot be read"):
        reader.read(objects)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_save_formats_and_shared_storage(tmp_path, legacy):
    base = torch.randn(4, 5)
    payload = {"a": base, "view": base[1:3, ::2], "half": torch.ones(2, dtype=torch.float16), "n": [1, (2, 3)]}
    path = tmp_path / "t.pt"
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    ckpt = reader.read(path)
    assert ckpt.format == ("torch.save (legacy)" if legacy else "torch.save (zip)")
    obj = ckpt.obj
    assert torch.equal(obj["a"], base) and torch.equal(obj["view"], base[1:3, ::2])
    assert obj["half"].dtype == torch.float16 and obj["n"] == [1, (2, 3)]
    assert obj["view"].untyped_storage().data_ptr() == obj["a"].untyped_storage().data_ptr()


def test_plain_pickle_of_tensors_views_the_file_bytes(tmp_path):
    path = tmp_path / "t.pkl"
    x = torch.randn(1000)
    path.write_bytes(pickle.dumps({"x": x, "p": torch.nn.Parameter(x[:10].clone())}))
    obj = reader.read(path).obj
    assert torch.equal(obj["x"], x) and torch.equal(obj["p"], x[:10])
    assert type(obj["p"]) is torch.Tensor  # a parameter's data only


def test_bad_files_are_one_sentence(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"x": torch.randn(100)}))
    cases = {
        "text.pkl": (b"hello world, not a checkpoint\n", "not an official IMM checkpoint: it begins"),
        "empty.pkl": (b"", "it is empty"),
        "arr.npy": (b"\x93NUMPY" + b"\x00" * 40, "NumPy"),
        "trunc.pkl": (good.read_bytes()[:200], "truncated"),
    }
    for name, (data, words) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CheckpointError, match=words) as e:
            reader.read(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
    zipped = tmp_path / "z.pt"
    torch.save({"x": torch.randn(1000)}, zipped)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(zipped.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        reader.read(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        reader.read(tmp_path / "missing.pkl")


def test_bytes_buffer_stays_readable_after_read(tmp_path):
    """Tensors that view the file's bytes outlive the reader (the bytes are kept alive by the tensors)."""
    path = tmp_path / "t.pkl"
    x = torch.randn(64, 64)
    path.write_bytes(pickle.dumps({"x": x}))
    obj = reader.read(path).obj
    import gc

    gc.collect()
    assert torch.equal(obj["x"].clone(), x) and torch.equal((obj["x"] @ obj["x"].T), x @ x.T)
    assert io.BytesIO  # (used by the reader; keeps the import list honest)
