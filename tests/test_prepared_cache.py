"""The prepared-model cache (models.prepared): exact compact entries, damaged entries rebuilt, the
cache folder's housekeeping, `np-jax cache`, and the lazy GGUF model with its remembered digest.
On the tiny model of tests/test_recipe.py (same shapes: its compiled programs are reused)."""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from models import llama, prepared, recipe as R
from models.config import ModelConfig, get_config
from models.io import load as L
from models.io.gguf import GGUFError, GGUFTokenizerData, write_llama_gguf
from models.io.load import load_model
from models.io.tokenizer import BYTE_TO_UNICODE
from models.io.weights import load_gguf
from np_jax.cli import main

CFG = get_config("tiny").replace(d_ff=96)
RECIPE = dataclasses.replace(R.get_recipe("rotate-gptq"), calib_windows=2)
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def q8_0(a: np.ndarray) -> np.ndarray:
    """`a` through ggml's own Q8_0 (as a GGUF file's embedding table is)."""
    return gguf.quants.dequantize(gguf.quants.quantize(np.asarray(a, np.float32), Q8_0), Q8_0).astype(np.float32)


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_identical(a, b):
    """Every leaf equal bit for bit, with its dtype and shape (np.array_equal calls -0.0 == 0.0)."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        x, y = la[k], lb[k]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True), k
        assert x.tobytes() == y.tobytes(), k


@pytest.fixture(scope="module")
def model():
    """The tiny model as `prepare` sees a model file: a file hash, and its embedding on GGUF's Q8_0 grid."""
    p = llama.init_params(CFG, jax.random.key(0))
    k = jax.random.split(jax.random.key(1), 3)
    lay = dict(p["layers"])  # norm gains away from 1, so that folding them changes the weights
    lay["attn_norm"] = 1 + 0.3 * jax.random.normal(k[0], lay["attn_norm"].shape)
    lay["mlp_norm"] = 1 + 0.3 * jax.random.normal(k[1], lay["mlp_norm"].shape)
    base = {**p, "layers": lay, "final_norm": 1 + 0.3 * jax.random.normal(k[2], p["final_norm"].shape),
            "embed": jax.numpy.asarray(q8_0(p["embed"]))}
    return dataclasses.replace(load_model("tiny"), cfg=CFG, params=base, sha256="1" * 64)


@dataclasses.dataclass
class Real:
    cfg: ModelConfig
    params: dict
    entry: Path
    logs: list


@pytest.fixture(scope="module")
def real(model, tmp_path_factory):
    """RECIPE at w4a4 (the recipe really run) and the entry it left in a cache of its own."""
    root = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NP_JAX_CACHE", str(root))
        logs = []
        cfg, params, info = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    assert not info["cached"]
    return Real(cfg, params, Path(info["cache"]), logs)


@pytest.fixture
def fast(real, monkeypatch, tmp_path):
    """A fresh cache folder, and a preparation that returns the real one at once (counting the calls)."""
    monkeypatch.setenv("NP_JAX_CACHE", str(tmp_path))
    calls = []

    def apply(params, cfg, recipe, policy, windows, log=None, learned=None):
        calls.append(policy)
        return real.cfg, real.params

    monkeypatch.setattr(prepared.recipes, "apply", apply)
    monkeypatch.setattr(prepared, "calibration_windows", lambda *a, **k: np.zeros((2, 8), np.int32))
    return calls


def test_an_entry_is_the_recipe_output_bit_for_bit_in_integer_codes(model, real, monkeypatch):
    monkeypatch.setenv("NP_JAX_CACHE", str(real.entry.parent.parent))
    logs = []
    cfg, params, info = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    assert info["cached"] and cfg == real.cfg
    assert_identical(params, real.params)
    meta = json.loads((real.entry / "meta.json").read_text())
    forms = {".".join(r["path"]): (r["codec"], r.get("bits")) for r in meta["leaves"]}
    assert {forms[f"layers.{m}.w"] for m in llama.LINEARS} == {("grid", 4)}  # w4a4: two codes a byte
    # the embedding and the output layer's INT8 codes are recomputed from the model file
    assert forms["lm_head.w"] == ("head", 8) and forms["embed"] == ("rotated", None)
    # the size, from the shapes alone: the layers' codes, every other leaf but the two recomputed
    # ones as it is; each array padded to 64 bytes at most
    p = leaves(real.params)
    grid = {f"['layers']['{b}']['{m}']['w']" for b, m in (n.split(".") for n in llama.LINEARS)}
    derived = {"['lm_head']['w']", "['embed']"}
    want = sum(-(-a.size // 2) if k in grid else 0 if k in derived else a.nbytes for k, a in p.items())
    n_buffers = len(p) - len(derived)
    assert want <= meta["bytes"] < want + 64 * n_buffers
    assert (real.entry / "arrays.bin").stat().st_size == meta["bytes"]
    assert meta["bytes"] < sum(a.nbytes for a in p.values()) / 3
    assert any("cached the prepared model" in m for m in real.logs)


@settings(max_examples=25)
@given(st.data())
def test_any_tree_round_trips_exactly_in_its_smallest_exact_form(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    bits = data.draw(st.sampled_from([4, 8]))
    n, k, m = (data.draw(st.integers(1, 5)) for _ in range(3))
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    codes = rng.integers(lo, hi + 1, (n, k, m)).astype(np.float32)
    step = (rng.uniform(0.5, 2, (n, m)) * 2.0 ** rng.integers(-20, 20, (n, m))).astype(np.float32)
    w = codes * step[:, None, :]
    off_grid = data.draw(st.booleans())
    if off_grid:  # one value a float32 ulp off its grid point: its step's grid cannot hold it
        i = data.draw(st.integers(0, w.size - 1))
        w.reshape(-1)[i] = np.nextafter(w.reshape(-1)[i], np.float32(np.inf))
    table = q8_0(rng.normal(size=(data.draw(st.integers(64, 70)), 32)))
    tree = {"lin": {"w": w, "s_w": step}, "table": table, "scalar": np.float32(rng.normal()),
            "half": rng.normal(size=3).astype(np.float16), "neg0": np.array([-0.0, 0.0], np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "entry"
        meta = prepared.write_entry(d, CFG, tree, {"x": 1})
        cfg, got, _ = prepared.read_entry(d, {"x": 1})
    assert cfg == CFG
    assert_identical(got, tree)
    forms = {".".join(r["path"]): (r["codec"], r.get("bits")) for r in meta["leaves"]}
    if off_grid:
        assert forms["lin.w"] == ("raw", None)
    else:
        fits4 = [bool(c.min() >= -8 and c.max() <= 7) for c in codes]
        per_layer = sum(-(-c.size // 2) if f else c.size for c, f in zip(codes, fits4))  # packed nibbles: bytes
        # the smallest exact form (ties: the uniform one): INT4, INT8, or each layer at its own width
        want = 4 if all(fits4) else [4 if f else 8 for f in fits4] if per_layer < codes.size else 8
        assert forms["lin.w"] == ("grid", want)
    assert forms["table"] == ("block", None)


def _flip(f: Path, offset: int, bit: int):
    b = bytearray(f.read_bytes())
    b[offset % len(b)] ^= 1 << bit
    f.write_bytes(bytes(b))


def _edit_meta(edit):
    def damage(d):
        meta = json.loads((d / "meta.json").read_text())
        edit(meta)
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return damage


def _set_leaf(path, key, value):
    def edit(meta):
        next(r for r in meta["leaves"] if r["path"] == path)[key] = value
    return edit


FAULTS = {
    **{f"{f} empty": (lambda d, f=f: (d / f).write_bytes(b"")) for f in ("meta.json", "arrays.bin")},
    **{f"{f} missing": (lambda d, f=f: (d / f).unlink()) for f in ("meta.json", "arrays.bin")},
    **{f"{f} truncated at {x}": (lambda d, f=f, x=x: (d / f).write_bytes((d / f).read_bytes()[:int(x * (d / f).stat().st_size)]))
       for f in ("meta.json", "arrays.bin") for x in (0.001, 0.5, 0.999)},
    "arrays.bin one byte longer": lambda d: (d / "arrays.bin").write_bytes((d / "arrays.bin").read_bytes() + b"\0"),
    **{f"{f} bit flip at {x}": (lambda d, f=f, x=x: _flip(d / f, int(x * (d / f).stat().st_size), 3))
       for f in ("meta.json", "arrays.bin") for x in (0.0, 0.3, 0.7, 0.9999)},
    "rope_theta 10000 -> 90000": _edit_meta(lambda m: m["model_config"].update(rope_theta=90000.0)),
    "sink_positions 1 -> 3": _edit_meta(lambda m: m["model_config"].update(sink_positions=3)),
    "an older format": _edit_meta(lambda m: m.update(format="np_jax.prepared/2")),
    "a layer's codes read as INT8": _edit_meta(_set_leaf(["layers", "attn", "q", "w"], "bits", 8)),
    "another rotation seed": _edit_meta(_set_leaf(["embed"], "rotation", {"hadamard": CFG.d_model, "seed": 1})),
    "the hash itself": _edit_meta(lambda m: m.update(sha256="0" * 64)),
    "the entry is a file": lambda d: (shutil.rmtree(d), d.write_bytes(b"x")),
}


def _check(model, real, calls, damage=None) -> bool:
    """Damage a copy of the real entry, prepare: either rebuilt (one line, a fresh preparation,
    a good entry again) or, for a change that alters no content, the identical model. Never a
    different model, never a traceback. Returns whether it was rebuilt."""
    d = prepared.cache_root() / real.entry.name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(real.entry, d)
    if damage is not None:
        damage(d)
    calls.clear()
    logs = []
    cfg, params, info = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    assert cfg == real.cfg
    assert_identical(params, real.params)
    # an entry made to look older is removed as one ("removed 1 prepared-model cache entry of an older format")
    said = [m for m in logs if "is damaged (" in m or "entry of an older format" in m]
    if info["cached"]:
        assert not calls and not said
        return False
    assert calls == ["w4a4"] and len(said) == 1 and "\n" not in said[0]
    assert "older format" in said[0] or (said[0].startswith(f"the prepared-model cache entry {d} is damaged (")
                                         and said[0].endswith("rebuilding it"))
    assert prepared.prepare(model, RECIPE, "w4a4")[2]["cached"]  # rebuilt whole
    return True


def test_an_undamaged_copy_is_used(model, real, fast):
    assert not _check(model, real, fast)


def test_meta_reformatted_with_the_same_content_is_used(model, real, fast):
    damage = lambda d: (d / "meta.json").write_text(json.dumps(json.loads((d / "meta.json").read_text()), indent=4))  # noqa: E731
    assert not _check(model, real, fast, damage)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_entry_is_reported_and_rebuilt(model, real, fast, fault):
    assert _check(model, real, fast, FAULTS[fault])


def test_leaves_that_no_longer_recompute_from_the_model_file_are_rebuilt(model, real, fast):
    """The embedding and the output layer are recomputed from the model file's tensors: a file
    that gives other values (here its final norm) is caught by their SHA-256, never used."""
    other = dataclasses.replace(model, params={**model.params, "final_norm": model.params["final_norm"] * 1.5})
    assert _check(other, real, fast)
    with pytest.raises(prepared.DamagedEntry, match="need the model file"):
        prepared.read_entry(real.entry)


# the function-scoped fixtures carry nothing from one example to the next: each copies a fresh entry
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(file=st.sampled_from(["meta.json", "arrays.bin"]), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7), truncate=st.booleans())
def test_any_flipped_bit_or_truncation_is_rebuilt_or_harmless(model, real, fast, file, where, bit, truncate):
    def damage(d):
        f = d / file
        if truncate:
            f.write_bytes(f.read_bytes()[:int(where * f.stat().st_size)])
        else:
            _flip(f, int(where * f.stat().st_size), bit)
    _check(model, real, fast, damage)


def test_older_formats_and_unfinished_entries_are_removed(model, real, fast, tmp_path):
    root = prepared.cache_root()
    root.mkdir(parents=True)
    for name, fmt in (("old", "np_jax.prepared/2"), ("newer", "np_jax.prepared/99")):
        (root / name).mkdir()
        (root / name / "meta.json").write_text(json.dumps({"format": fmt}))
        (root / name / "params.npz").write_bytes(bytes(1000))
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    tmps = {"dead": f".tmp-{host}-{dead.pid}-a", "live": f".tmp-{host}-{os.getpid()}-b",
            "old elsewhere": ".tmp-elsewhere-1-c", "fresh elsewhere": ".tmp-elsewhere-1-d"}
    for name in tmps.values():
        (root / name).mkdir()
        (root / name / "arrays.bin").write_bytes(bytes(10))
    past = time.time() - prepared.STALE_TMP_S - 60
    os.utime(root / tmps["old elsewhere"], (past, past))
    logs = []
    prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    left = {p.name for p in root.iterdir()}
    assert {"newer", tmps["live"], tmps["fresh elsewhere"], real.entry.name} == left
    assert any("removed 1 prepared-model cache entry of an older format and 2 unfinished" in m for m in logs)


def test_an_interrupted_write_leaves_nothing(real, fast, monkeypatch):
    root = prepared.cache_root()

    def interrupt(src, dst):  # Ctrl-C as the finished entry is renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepared.write_entry(root / "k", real.cfg, real.params, {})
    assert list(root.iterdir()) == []


def test_an_unwritable_cache_is_said_before_preparing(model, real, fast, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NP_JAX_CACHE", str(tmp_path / "file" / "cache"))
    logs = []
    monkeypatch.setattr(prepared, "calibration_windows", lambda *a, **k: logs.append("PREPARING") or np.zeros((2, 8)))
    cfg, params, info = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    warning = [i for i, m in enumerate(logs) if m.startswith("warning: cannot write the prepared-model cache")]
    assert warning and warning[0] < logs.index("PREPARING") and not info["cached"]
    assert_identical(params, real.params)
    assert not any("cached the prepared model" in m for m in logs)


def test_a_float_policy_is_not_cached(model, fast):
    cfg, params, info = prepared.prepare(model, RECIPE, "float")
    assert cfg == model.cfg and params is model.params and not fast and info["cache"] is None
    assert not prepared.cache_root().exists()


def _tokenizer() -> GGUFTokenizerData:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [BYTE_TO_UNICODE[b] for b in range(256)]
    return GGUFTokenizerData(model="gpt2", pre="smollm", tokens=tuple(tokens), merges=(), token_types=(3, 3, 3) + (1,) * 256,
                             bos_id=1, eos_id=2, unk_id=None, pad_id=None, add_bos=False, add_eos=False, chat_template=None)


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NP_JAX_CACHE", str(tmp_path / "cache"))
    hp = ModelConfig("small-gguf", n_layers=1, d_model=64, d_ff=64, n_heads=2, n_kv_heads=1, head_dim=32,
                     vocab_size=259, max_seq_len=64)
    rng = np.random.default_rng(0)
    t = {"embed": rng.normal(size=(259, 64)), "final_norm": np.ones(64), "layers.0.attn_norm": np.ones(64),
         "layers.0.mlp_norm": np.ones(64), "layers.0.q": rng.normal(size=(64, 64)), "layers.0.k": rng.normal(size=(32, 64)),
         "layers.0.v": rng.normal(size=(32, 64)), "layers.0.o": rng.normal(size=(64, 64)),
         **{f"layers.0.{m}": rng.normal(size=(64, 64)) for m in ("gate", "up", "down")}}
    path = tmp_path / "small-gguf.gguf"
    write_llama_gguf(path, hp, t, _tokenizer(), matrix_type=gguf.GGMLQuantizationType.Q4_1, embed_type=Q8_0)
    return path


def test_a_gguf_model_decodes_its_tensors_only_when_used(gguf_file, monkeypatch):
    m = load_model(gguf=str(gguf_file))
    want_cfg, want = load_gguf(gguf_file, name="small-gguf")
    # the tensors a cache entry is recomputed from, read alone
    assert_identical(m.file_tensors(("embed", "final_norm")), {n: want[n] for n in ("embed", "final_norm")})
    assert not m.params_loaded and m.cfg == want_cfg and m.encoder.encode("ab") == [3 + 0x61, 3 + 0x62]
    assert_identical(m.params, want)
    assert m.params_loaded
    # a cache hit never decodes them (an identity preparation stands in for the recipe)
    monkeypatch.setattr(prepared.recipes, "apply", lambda params, cfg, *a, **k: (cfg, params))
    monkeypatch.setattr(prepared, "calibration_windows", lambda *a, **k: np.zeros((2, 8), np.int32))
    assert not prepared.prepare(m, RECIPE, "w4a4")[2]["cached"]
    again = load_model(gguf=str(gguf_file))
    cfg, params, info = prepared.prepare(again, RECIPE, "w4a4")
    assert info["cached"] and not again.params_loaded
    assert_identical(params, want)
    # the file changed after it was opened: its hash is no longer its own
    later = load_model(gguf=str(gguf_file))
    os.utime(gguf_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(GGUFError, match="changed while in use"):
        later.params


def test_a_file_digest_is_remembered_with_a_check_of_its_own(gguf_file, monkeypatch):
    monkeypatch.setattr(L, "DIGESTS_FROM_BYTES", 0)  # the test file is small
    true = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert L.file_sha256(gguf_file) == true
    memo_file = Path(os.environ["NP_JAX_CACHE"]) / L.DIGESTS_FILE
    key = os.path.abspath(gguf_file)
    rec = json.loads(memo_file.read_text())[key]
    st_ = gguf_file.stat()
    assert (rec["sha256"], rec["size"], rec["mtime_ns"]) == (true, st_.st_size, st_.st_mtime_ns)

    def record(digest, check_of=None):  # a record as another run left it: its check covers path, size, mtime, digest
        check = hashlib.sha256(f"{key}\0{st_.st_size}\0{st_.st_mtime_ns}\0{check_of or digest}".encode()).hexdigest()[:16]
        memo_file.write_text(json.dumps({key: {**rec, "sha256": digest, "check": check}}))

    record("a" * 64)
    assert L.file_sha256(gguf_file) == "a" * 64  # served from the record: the file is not read again
    record("b" * 64, check_of="a" * 64)  # a damaged record: recomputed
    assert L.file_sha256(gguf_file) == true
    memo_file.write_text("{not json")
    assert L.file_sha256(gguf_file) == true and json.loads(memo_file.read_text())[key]["sha256"] == true
    os.utime(gguf_file, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1))  # touched: hashed again
    record("a" * 64)
    assert L.file_sha256(gguf_file) == true


def test_cache_command_lists_and_frees(real, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NP_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("NP_JAX_CACHE_MAX", "2GiB")
    root = prepared.cache_root()
    shutil.copytree(real.entry, root / real.entry.name)
    (root / "old").mkdir()
    (root / "old" / "meta.json").write_text(json.dumps({"format": "np_jax.prepared/2"}))
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(root) in out and real.entry.name[:12] in out and "tiny" in out and "w4a4" in out and "rotate-gptq" in out
    assert "older format" in out and "2 entries" in out and "bound 2.15 GB" in out and "USED" in out
    assert main(["cache", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["limit_bytes"] == 2**31 and all(isinstance(e["used"], float) for e in listed["entries"])
    by_key = {e["key"]: e for e in listed["entries"]}
    assert by_key[real.entry.name]["bytes"] == size(root / real.entry.name)
    assert listed["total_bytes"] == size(root) and listed["location"] == str(root)
    for bad in (["cache", "clear"], ["cache", "clear", "zz"], ["cache", "clear", "--all", "old"]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("np-jax cache") and "error:" in err and err.count("\n") == 1
    assert len(list(root.iterdir())) == 2  # nothing removed by a refused command
    assert main(["cache", "clear", real.entry.name[:8]]) == 0
    assert [p.name for p in root.iterdir()] == ["old"]
    assert main(["cache", "clear", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["removed"] == ["old"]
    assert list(root.iterdir()) == []


@settings(max_examples=10, deadline=None)
@given(widths=st.lists(st.sampled_from([4, 8]), min_size=2, max_size=4).filter(lambda w: 4 in w and 8 in w),
       k=st.integers(2, 5), m=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))  # >= 2 codes: packing saves
def test_a_stack_of_layers_of_several_widths_keeps_each_at_its_own(widths, k, m, seed):
    """A per-layer policy's weight stack: every layer's codes packed at its own width, exact."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(-8, 8, (k, m)) if b == 4 else rng.integers(-128, 128, (k, m)) for b in widths])
    codes[[i for i, b in enumerate(widths) if b == 8][0], 0, 0] = -128  # an 8-bit layer needs its 8 bits
    step = rng.uniform(0.5, 2, (len(widths), m)).astype(np.float32)
    tree = {"lin": {"w": codes.astype(np.float32) * step[:, None, :], "s_w": step}}
    with tempfile.TemporaryDirectory() as tmp:
        meta = prepared.write_entry(Path(tmp) / "e", CFG, tree, {"x": 1})
        _, got, _ = prepared.read_entry(Path(tmp) / "e", {"x": 1})
    assert_identical(got, tree)
    rec = next(r for r in meta["leaves"] if r["path"] == ["lin", "w"])
    assert rec["codec"] == "grid" and rec["bits"] == widths
    assert rec["buffers"][0]["nbytes"] == sum(-(-k * m // 2) if b == 4 else k * m for b in widths)


# --- the size bound ($NP_JAX_CACHE_MAX) ------------------------------------------------------------------

@pytest.mark.parametrize("raw, want", [("", prepared.DEFAULT_LIMIT), ("5GB", 5 * 10**9), ("800 MB", 8 * 10**8),
                                       ("2GiB", 2 * 2**30), ("1.5g", 15 * 10**8), ("123", 123), ("none", None),
                                       ("Unlimited", None)])
def test_the_size_bound_reads_sizes_with_units(monkeypatch, raw, want):
    monkeypatch.setenv("NP_JAX_CACHE_MAX", raw)
    assert prepared.cache_limit() == want


@pytest.mark.parametrize("raw", ["5x", "-1GB", "0", "GB", "1e9", "0.1"])
def test_a_bad_size_bound_is_refused_before_preparing(model, fast, monkeypatch, raw):
    monkeypatch.setenv("NP_JAX_CACHE_MAX", raw)
    with pytest.raises(ValueError, match="NP_JAX_CACHE_MAX="):
        prepared.prepare(model, RECIPE, "w4a4")
    assert not fast  # nothing prepared


def _fake_entries(root: Path, sizes: list[int], fmt: str = prepared.FORMAT) -> list[Path]:
    """Entries of format `fmt` (default: this one, which the bound counts) of the given sizes, used
    one second apart in order."""
    root.mkdir(parents=True, exist_ok=True)
    out, t0 = [], time.time() - 3600
    for i, n in enumerate(sizes):
        d = root / f"fake{i:02d}-v{fmt.rsplit('/', 1)[1]}"
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"format": fmt, "inputs": {"model": "tiny"}}))
        (d / "arrays.bin").write_bytes(bytes(n))
        os.utime(d, (t0 + i, t0 + i))
        out.append(d)
    return out


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 400_000), min_size=0, max_size=6), slack=st.floats(0, 1.5),
       order=st.randoms(use_true_random=False))
def test_a_new_entry_evicts_the_least_recently_used_until_the_cache_fits(model, real, fast, monkeypatch,
                                                                          sizes, slack, order):
    root = prepared.cache_root()
    shutil.rmtree(root, ignore_errors=True)
    fast.clear()
    fakes = _fake_entries(root, sizes)
    other = _fake_entries(root, [10**6], "np_jax.prepared/99")[0]  # another format: never counted
    used = fakes[:]
    order.shuffle(used)  # then read in this order: the time of use, not of making, decides
    t0 = time.time() - 1800
    for i, d in enumerate(used):
        os.utime(d, (t0 + i, t0 + i))
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    sizes = {d: size(d) for d in fakes}
    limit = max(1, int(slack * (sum(sizes.values()) + size(real.entry))))
    monkeypatch.setenv("NP_JAX_CACHE_MAX", str(limit))
    logs = []
    cfg, params, info = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    entry = Path(info["cache"])
    assert entry.is_dir() and other.is_dir() and fast == ["w4a4"]  # the new entry is kept, whatever its size
    kept = [d for d in used if d.is_dir()]
    gone = [d for d in used if not d.is_dir()]
    total = size(entry) + sum(sizes[d] for d in kept)
    assert total <= limit or not kept  # it fits, or only the new entry is left
    assert used[:len(gone)] == gone  # the least recently used went first ...
    if gone:  # ... and no more than needed
        assert total + sizes[gone[-1]] > limit
        assert any(m.startswith(f"removed {len(gone)} least recently used prepared-model cache entr") for m in logs)
    assert any(m.startswith("warning:") and "alone exceeds" in m for m in logs) == (size(entry) > limit)


def test_reading_an_entry_makes_it_the_most_recently_used(model, real, fast, monkeypatch):
    root = prepared.cache_root()
    a, b = _fake_entries(root, [1000, 1000])
    shutil.copytree(real.entry, root / real.entry.name)
    past = time.time() - 7200
    os.utime(root / real.entry.name, (past, past))  # the oldest, until it is read
    assert prepared.prepare(model, RECIPE, "w4a4")[2]["cached"]
    listed = {e.path.name: e.used for e in prepared.entries()}
    assert listed[real.entry.name] > max(listed[a.name], listed[b.name])
    # a new entry (of about the same size) that passes the bound removes a and b, not the entry just read
    size = sum(f.stat().st_size for f in real.entry.rglob("*") if f.is_file())
    monkeypatch.setenv("NP_JAX_CACHE_MAX", str(2 * size + 500))
    assert not prepared.prepare(model, RECIPE, "w8a8")[2]["cached"]
    assert not a.exists() and not b.exists() and (root / real.entry.name).is_dir()
