"""Fuzzing model folders: a tiny valid HF folder (config.json, model.safetensors,
tokenizer.json) is mutated (truncated files, lying header lengths, offsets, dtypes and
shapes, invalid JSON, absurd config sizes, missing fields, a broken tokenizer.json)
and loaded. Each load succeeds or raises a ValueError (FileNotFoundError for a shard
an index names that is not there) naming the file, and the tensor / field where one
is at fault; never another exception, never a hang, and never a large allocation:
the loads run on the host (`on_host=True`) under tracemalloc, whose peak (numpy
buffers included) must stay under PEAK_BYTES, a fraction of what any lying size
would need.

Then the security checks of the folder: pickle weights are refused without being
unpickled, `auto_map` / `trust_remote_code` never import the folder's code, and no
file outside the folder is read (index entries with "../" or absolute paths, symlinks
escaping the folder), while the HF hub cache's snapshot -> blobs symlinks still load.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import strategies as st

from fuzz_support import bounded, run_property, write_random_hf_folder
from strategies import HUGE_INTS, junk
from jaxinfer.config import ModelConfig
from jaxinfer.models import checkpoint, lazy_checkpoint, registry
from jaxinfer.models.tokenizer import load_tokenizer

PEAK_BYTES = 32 << 20  # the tiny model is ~60 KB; any lying size would need far more

HF_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=16,
                 intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def build_folder(path: str) -> str:
    """A valid tiny Llama folder (random float32 weights, a word-level tokenizer.json) at `path`."""
    write_random_hf_folder(path, HF_CONFIG)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(_tokenizer_json())
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = build_folder(str(tmp_path_factory.mktemp("pristine")))
    config, params, _ = checkpoint.load_model(path, on_host=True)  # the baseline loads
    assert config.num_layers == 2 and load_tokenizer(path).vocab_size == 64
    return path


def _load_everything(path: str):
    """What a session does with a folder, on the host: config, weights (eager and lazy), tokenizer."""
    config, params, _ = checkpoint.load_model(path, on_host=True)
    lazy_checkpoint.lazy_hf_params(path, config, "float32")
    load_tokenizer(path)
    return config


def _header(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(header, data: bytes) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text)) + text + data


# One mutation of the safetensors file: (kind, parameters drawn for it).
st_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("header_len"), st.one_of(HUGE_INTS, st.integers(0, 2**64 - 1), st.integers(0, 4096))),
    st.tuples(st.just("header_bytes"), st.one_of(st.binary(max_size=64), junk.map(lambda v: json.dumps(v).encode()
                                                                                  if _jsonable(v) else b"\xff"))),
    st.tuples(st.just("offsets"), st.tuples(st.integers(0, 20), st.one_of(
        st.lists(st.one_of(st.integers(-5, 70_000), HUGE_INTS), min_size=0, max_size=3), junk))),
    st.tuples(st.just("overlap"), st.tuples(st.integers(0, 20), st.integers(0, 20))),
    st.tuples(st.just("shape"), st.tuples(st.integers(0, 20), st.one_of(
        st.lists(st.one_of(st.integers(0, 64), HUGE_INTS), max_size=4), junk))),
    st.tuples(st.just("dtype"), st.tuples(st.integers(0, 20), st.one_of(
        st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "C64", "", "f32"]),
        junk))),
    st.tuples(st.just("entry"), st.tuples(st.integers(0, 20), junk)),
)


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _mutate_safetensors(file: str, kind: str, arg) -> None:
    with open(file, "rb") as f:
        raw = f.read()
    header, data = _header(raw)
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "truncate":
        raw = raw[:int(len(raw) * arg)]
    elif kind == "header_len":
        raw = struct.pack("<Q", arg % 2**64) + raw[8:]
    elif kind == "header_bytes":
        raw = _with_header(arg, data)
    else:
        index, value = arg
        entry = header[names[index % len(names)]]
        if kind == "offsets":
            entry["data_offsets"] = value
        elif kind == "overlap":
            other = header[names[value % len(names)]]
            entry["data_offsets"] = [other["data_offsets"][0], other["data_offsets"][0]
                                     + entry["data_offsets"][1] - entry["data_offsets"][0]]
        elif kind == "shape":
            entry["shape"] = value
        elif kind == "dtype":
            entry["dtype"] = value
        elif kind == "entry":
            header[names[index % len(names)]] = value
        if not _jsonable(header):
            return
        raw = _with_header(header, data)
    with open(file, "wb") as f:
        f.write(raw)


def _check_error(error: BaseException, *names: str) -> None:
    message = str(error)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {message}"
    assert any(n in message for n in names), f"the error does not name {names}: {message}"


def _bounded_load(path: str, *names: str) -> None:
    tracemalloc.start()
    try:
        with bounded(30, "loading a folder"):
            try:
                _load_everything(path)
            except (ValueError, FileNotFoundError) as e:
                _check_error(e if isinstance(e, ValueError) else ValueError(str(e)), *names)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak host allocation {peak} bytes while loading"


def test_corrupt_safetensors_headers(pristine, fuzz_profile):
    """The reader alone (no model): cheap, many examples."""
    source = os.path.join(pristine, "model.safetensors")

    @run_property("safetensors header", fuzz_profile, ci=200, slow=8_000, mutation=st_mutations)
    def prop(mutation):
        with tempfile.TemporaryDirectory() as tmp:
            file = os.path.join(tmp, "model.safetensors")
            shutil.copy(source, file)
            _mutate_safetensors(file, *mutation)
            tracemalloc.start()
            try:
                with bounded(10):
                    try:
                        tensors = checkpoint.read_safetensors(file)
                    except ValueError as e:
                        _check_error(e, file)
                        return
                    for arr in tensors.values():  # every view is readable, inside the file
                        np.asarray(arr).sum()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < PEAK_BYTES


CONFIG_KEYS = sorted(HF_CONFIG) + ["head_dim", "rope_scaling", "rope_theta", "rms_norm_eps", "hidden_act"]
ABSURD = st.sampled_from([10**9, 10**12, -64, 0, 16.5, 1e300, "64", "big", None, True, [], {}, [3, 4], 2**31, 4096,
                          {"rope_type": "llama3", "factor": -1}])


def test_mutated_model_folders(pristine, fuzz_profile):
    folder_mutations = st.one_of(
        st.tuples(st.just("safetensors"), st_mutations),
        st.tuples(st.just("config"), st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), st.one_of(ABSURD, junk),
                                                        st.booleans()), min_size=1, max_size=3)),
        st.tuples(st.just("config_text"), st.one_of(st.binary(max_size=40), st.just(b"[1, 2]"),
                                                    st.just(b'{"model_type": "llama",'))),
        st.tuples(st.just("tokenizer"), st.one_of(st.binary(max_size=40), st.floats(0, 1, exclude_max=True))),
        st.tuples(st.just("index"), st.one_of(junk, st.dictionaries(st.text(max_size=30), st.one_of(
            st.sampled_from(["model.safetensors", "missing.safetensors", "../model.safetensors", "/etc/passwd",
                             "", "sub/../model.safetensors"]), junk), max_size=3))),
    )

    @run_property("model folder", fuzz_profile, ci=15, slow=600, mutation=folder_mutations)
    def prop(mutation):
        kind, arg = mutation
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model")
            shutil.copytree(pristine, path)
            if kind == "safetensors":
                _mutate_safetensors(os.path.join(path, "model.safetensors"), *arg)
                names = ("model.safetensors",)
            elif kind == "config":
                hf = dict(HF_CONFIG)
                for key, value, delete in arg:
                    if delete:
                        hf.pop(key, None)
                    else:
                        hf[key] = value
                if not _jsonable(hf):
                    return
                with open(os.path.join(path, "config.json"), "w") as f:
                    json.dump(hf, f)
                # a size the weights do not have is named with the tensor and its file
                names = ("config.json", "model.safetensors") + tuple(k for k, _, _ in arg)
            elif kind == "config_text":
                with open(os.path.join(path, "config.json"), "wb") as f:
                    f.write(arg)
                names = ("config.json",)
            elif kind == "tokenizer":
                file = os.path.join(path, "tokenizer.json")
                if isinstance(arg, bytes):
                    data = arg
                else:
                    with open(file, "rb") as f:
                        data = f.read()
                    data = data[:int(len(data) * arg)]
                with open(file, "wb") as f:
                    f.write(data)
                names = ("tokenizer.json",)
            else:
                if not _jsonable(arg):
                    return
                with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                    json.dump({"weight_map": arg} if isinstance(arg, dict) else arg, f)
                names = ("model.safetensors.index.json", "model.safetensors", "missing.safetensors")
            _bounded_load(path, *names)


@pytest.mark.parametrize("hf_field, value", [
    ("num_hidden_layers", 10**9), ("num_hidden_layers", 4096), ("hidden_size", 10**9), ("vocab_size", -5),
    ("vocab_size", 64.5), ("vocab_size", "64"), ("intermediate_size", 2**40), ("max_position_embeddings", 10**12)])
def test_absurd_config_sizes_are_refused_before_allocating(pristine, tmp_path, hf_field, value):
    path = str(tmp_path / "model")
    shutil.copytree(pristine, path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**HF_CONFIG, hf_field: value}, f)
    tracemalloc.start()
    try:
        with bounded(30), pytest.raises(ValueError) as info:
            _load_everything(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "config.json" in message or "model.safetensors" in message, message
    assert hf_field in message or "tensor" in message, message
    assert peak < PEAK_BYTES


# ---------------------------------------------------------------------------- security

class _Marker:
    """Unpickling this writes a file: the proof that pickle code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_and_never_unpickled(pristine, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"model.embed_tokens.weight": _Marker(str(marker))})
    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    shutil.copy(os.path.join(pristine, "config.json"), only_pickle)
    for name in ("pytorch_model.bin", "model.pt", "consolidated.pth"):
        (only_pickle / name).write_bytes(evil)
    with pytest.raises(ValueError, match="pickle") as info:
        checkpoint.load_model(str(only_pickle))
    assert "pytorch_model.bin" in str(info.value)
    assert not lazy_checkpoint.is_lazy_loadable(str(only_pickle))
    both = tmp_path / "both"
    shutil.copytree(pristine, both)
    (both / "pytorch_model.bin").write_bytes(evil)
    _load_everything(str(both))  # the safetensors load; the pickle is never opened
    assert not marker.exists()


def test_remote_code_in_the_folder_never_runs(pristine, tmp_path):
    from jaxinfer.session import InferenceSession
    path = tmp_path / "model"
    shutil.copytree(pristine, path)
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').write('ran')\nclass EvilModel: pass\nclass EvilTokenizer: pass\n"
    for module in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (path / module).write_text(code)
    hf = dict(HF_CONFIG, trust_remote_code=True,
              auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(hf))
    (path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [
        "tokenization_evil.EvilTokenizer", None]}, "trust_remote_code": True}))
    session = InferenceSession.from_pretrained(str(path), engine=None)
    try:
        assert session.model_config.num_layers == 2 and session.tokenizer.vocab_size == 64
    finally:
        session.close()
    assert not marker.exists(), "a module of the model folder was imported"


def _write_index(path, weight_map):
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("target", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_entries_outside_the_folder_are_refused(pristine, tmp_path, target):
    path = tmp_path / "model"
    shutil.copytree(pristine, path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(str(path / "model.safetensors"), outside)  # a valid file: only its place is wrong
    name = str(outside) if target == "ABSOLUTE" else target
    names = checkpoint.read_safetensors(str(outside))
    _write_index(path, {n: name for n in names})
    for load in (lambda: checkpoint.load_model(str(path), on_host=True),
                 lambda: lazy_checkpoint.lazy_hf_params(str(path), registry.model_config_from_hf(HF_CONFIG),
                                                        "float32")):
        with pytest.raises(ValueError, match="outside the model folder") as info:
            load()
        assert name in str(info.value) and "model.safetensors.index.json" in str(info.value)


@pytest.mark.parametrize("linked", ["model.safetensors", "config.json", "tokenizer.json"])
def test_symlinks_escaping_the_folder_are_refused(pristine, tmp_path, linked):
    path = tmp_path / "model"
    shutil.copytree(pristine, path)
    outside = tmp_path / f"outside-{linked}"
    shutil.move(str(path / linked), outside)
    os.symlink(outside, path / linked)
    with pytest.raises(ValueError, match="outside the model folder") as info:
        _load_everything(str(path))
    assert linked in str(info.value)


def test_hf_hub_cache_symlinks_into_blobs_still_load(pristine, tmp_path):
    """snapshots/<rev>/file -> ../../blobs/<hash>, the layout huggingface_hub writes."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(pristine))):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(os.path.join(pristine, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / name)
    config = _load_everything(str(snapshot))
    assert config.num_layers == 2


def test_mutations_are_not_vacuous(pristine, tmp_path):
    """Each mutation kind, applied once by hand, really makes the folder fail to load."""
    for kind, arg in [("truncate", 0.5), ("header_len", 2**40), ("header_bytes", b"{not json"),
                      ("offsets", (0, [0, 10**9])), ("overlap", (1, 2)), ("shape", (0, [10**12, 10**12])),
                      ("dtype", (0, "F8_E4M3"))]:
        path = tmp_path / kind
        shutil.copytree(pristine, path)
        _mutate_safetensors(str(path / "model.safetensors"), kind, arg)
        with pytest.raises(ValueError, match="model.safetensors"):
            checkpoint.load_model(str(path), on_host=True)
