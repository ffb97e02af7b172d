"""Training: float fine-tuning and LSQ quantization-aware training (QAT), checkpoints, evaluation.

One loop serves both: the model's forward is `llama.forward(params, tokens, cfg, policy)`, the
same integer forward that serves on the emulated chip; for a quantized policy its custom VJPs
give the LSQ gradients (weights, weight steps and activation steps all learn). The optimizer is
`np_jax.optim.lsq_optimizer` (AdamW for weights, Adam for step sizes, the 200x warm start of
the activation steps).

QAT starts from float parameters (SmolLM2-135M from its GGUF file, a named config from random
init, or the newest checkpoint of a float run, `init_from`), whose step sizes are first
calibrated on training windows (`calibration`: "mse", much better without QAT and the default
here, or "lsq", the paper's initialisation). Optionally the loss distils the float model
(`distill` in [0, 1]: weight of KL(float teacher || student), the rest is next-token CE).

Determinism: there is no dropout; the data order is a pure function of (seed, step)
(models.data.TrainStream) and the CPU computation is deterministic, so a run interrupted at any
step and resumed from its last checkpoint ends with bit-identical parameters.

Checkpoints (orbax `CheckpointManager`, one directory per step under `out/`): items `params`,
`opt_state` (standard pytrees) and `meta` (JSON: settings, model config, step, tokens, wall
time). After orbax finalizes a step, `np_jax_manifest.json` is written into the step
directory (atomically, last): the size and SHA-256 of every file of the step and a SHA-256 of
the restored arrays. A step without a manifest is incomplete (interrupted while saving);
any size or hash mismatch, unreadable file or failing restore marks it corrupt. Loading takes
the newest step that verifies and reports each rejected one with the reason; when resuming
training, rejected steps are moved to `out/rejected/` so the run can write those steps again.

Data parallelism (`train(tc, devices=N)`, and always in a multi-process run, see
`np_jax.distributed`): the parameters and optimizer state are replicated over a 1-D "data"
mesh of N devices, each device takes `batch_size / N` sequences of every micro-batch, and the
jitted step's mean over the global batch becomes XLA's all-reduce of the gradients. Every
process computes the same data stream (it is a pure function of seed and step) and feeds its
devices their slice. Only process 0 writes logs, metrics and manifests; every process takes
part in orbax's saves. The result equals one-device training up to the order of the float
sums (tests/test_multiprocess.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from models import llama
from models.config import ModelConfig, get_config
from models.data import ByteEncoder, Corpus, DataConfig, Encoder, TokenizerEncoder, TrainStream, held_out_windows
from np_jax import optim
from np_jax.distributed import to_global, to_host
from np_jax.quant import get_policy

MANIFEST = "np_jax_manifest.json"
FORMAT = "np_jax.train/1"
DEFAULT_MODEL = "smollm2-135m"
STEP_FLOOR = 1e-8  # step sizes are kept >= this after every update (same floor as quant.init_step)

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CheckpointError(ValueError):
    """No usable checkpoint: missing, or one that cannot be read."""


class NoGoodCheckpoint(CheckpointError):
    """Every checkpoint of a run was rejected (corrupt or incomplete)."""


# --- settings --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    Units: `lr`, `step_lr` per optimizer step (Adam); `seq_len` tokens; a step consumes
    `grad_accum * batch_size * seq_len` target tokens.
    """

    out: str = "runs/train"                 # checkpoint directory (created; resumed if it holds checkpoints)
    model: str = DEFAULT_MODEL              # smollm2-135m (GGUF) or a named config (random init)
    gguf: str | None = None                 # a GGUF file instead of the packaged SmolLM2
    init_from: str | None = None            # start from the newest checkpoint of this run directory
    precision: str = "float"                # float: float training; w4a4, a8c8w4, w8a8: QAT
    calibration: str = "mse"                # initial step sizes for QAT: mse or lsq
    calib_windows: int = 4                  # training windows the activation steps are calibrated on
    steps: int = 100
    batch_size: int = 1                     # rows per micro-batch
    grad_accum: int = 4                     # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 1e-4                        # weights (AdamW) and other float parameters (Adam)
    step_lr: float | None = None            # step sizes (default: lr)
    weight_decay: float = 0.0
    warmup_steps: int = 0                   # linear learning-rate warm-up
    schedule: str = "cosine"                # cosine (to 10% at `steps`) or constant
    act_step_lr_mult: float = 200.0         # warm start of the activation steps (HPEC24 sec. V)
    act_step_warmup_steps: int = 250
    grad_clip: float | None = 1.0
    distill: float = 0.0                    # weight of KL(float teacher || model) in the loss
    seed: int = 0                           # data order (and random init of named configs)
    data_dirs: tuple[str, ...] = ()         # default: the standard library
    held_out_fraction: float = 0.05
    split_seed: int = 0
    save_every: int = 50                    # steps between checkpoints (and the last step)
    keep: int = 3                           # checkpoints kept
    log_every: int = 10                     # plain log lines (when no progress bar is shown)
    appliance_cards: int = 0                # >0: the forward runs through the card pipeline on this many cards

    # Settings that do not change the trajectory (may differ when resuming).
    FREE = ("out", "save_every", "keep", "log_every")

    def __post_init__(self):
        get_policy(self.precision)
        if self.calibration not in llama.CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose one of {', '.join(llama.CALIBRATIONS)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose cosine or constant")
        if self.appliance_cards < 0:
            raise ValueError(f"appliance cards must be >= 0, got {self.appliance_cards}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "keep", "calib_windows", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")
        if self.lr <= 0 or (self.step_lr is not None and self.step_lr <= 0):
            raise ValueError("learning rates must be > 0")
        if self.warmup_steps < 0 or self.act_step_warmup_steps < 0:
            raise ValueError("warm-up steps must be >= 0")
        DataConfig(self.data_dirs, self.held_out_fraction, self.split_seed)  # validates

    @property
    def data(self) -> DataConfig:
        return DataConfig(tuple(self.data_dirs), self.held_out_fraction, self.split_seed)

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.batch_size * self.seq_len

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["data_dirs"] = list(self.data_dirs)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["data_dirs"] = tuple(d.get("data_dirs", ()))
        return cls(**d)

    def differences(self, other: "TrainConfig") -> list[str]:
        """Settings that change the trajectory and differ (`steps` only matters for the cosine schedule)."""
        free = set(self.FREE) | ({"steps"} if self.schedule == other.schedule == "constant" else set())
        a, b = self.to_json(), other.to_json()
        return [f"{k}: {b[k]!r} (saved) vs {a[k]!r} (now)" for k in a if k not in free and a[k] != b[k]]


# --- models and tokenizers -------------------------------------------------------------------------

@dataclass
class Model:
    """A model ready to train or evaluate: config, float32 parameters, encoder, provenance."""

    cfg: ModelConfig
    params: llama.Params
    encoder: Encoder
    source: str


def _is_gguf(model: str, gguf: str | None) -> bool:
    return bool(gguf) or model == DEFAULT_MODEL


def make_encoder(model: str, gguf: str | None, cfg: ModelConfig) -> Encoder:
    """The model's tokenizer: the GGUF file's for GGUF models, UTF-8 bytes for random-init configs."""
    if _is_gguf(model, gguf):
        from models.gguf_loader import smollm2_gguf_path
        from models.tokenizer import Tokenizer

        path = gguf or smollm2_gguf_path()
        return TokenizerEncoder(Tokenizer.from_gguf(path), name=f"gguf:{Path(path).name}")
    return ByteEncoder(cfg.vocab_size)


def load_model(model: str = DEFAULT_MODEL, gguf: str | None = None, seed: int = 0,
               init_from: str | None = None, log: Log = _stderr) -> Model:
    """Float parameters from a GGUF file, random init of a named config, or a run's newest good checkpoint."""
    if init_from:
        ck = load_checkpoint(init_from, log=log)
        tc = ck.train_config
        return Model(ck.cfg, ck.params, make_encoder(tc.model, tc.gguf, ck.cfg),
                     f"checkpoint {ck.path} (step {ck.step}, {tc.precision})")
    if _is_gguf(model, gguf):
        from models import loaders
        from models.gguf_loader import smollm2_gguf_path

        path = gguf or smollm2_gguf_path()
        name = Path(gguf).stem if gguf and model == DEFAULT_MODEL else model
        cfg, params = loaders.load_gguf(path, name=name)
        return Model(cfg, params, make_encoder(model, gguf, cfg), f"GGUF {Path(path).name}")
    cfg = get_config(model)
    params = llama.init_params(cfg, jax.random.key(seed))
    return Model(cfg, params, make_encoder(model, None, cfg), f"random init (seed {seed})")


def model_config_from_json(d: dict) -> ModelConfig:
    return ModelConfig(**d)


# --- checkpoints -------------------------------------------------------------------------------------

def tree_sha256(tree) -> str:
    """SHA-256 over every leaf's key path, dtype, shape and bytes (flattening order)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = to_host(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_files(d: Path) -> dict[str, Path]:
    return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST}


def checkpoint_steps(out: str | Path) -> list[int]:
    """Step numbers of the step directories under `out` (complete or not), ascending."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(int(p.name) for p in out.iterdir() if p.is_dir() and p.name.isdigit())


def verify_files(step_dir: Path) -> str | None:
    """Why the step directory's files do not match its manifest (None when they do)."""
    mpath = step_dir / MANIFEST
    if not mpath.is_file():
        return "incomplete: no manifest (interrupted while saving?)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    present = _step_files(step_dir)
    for rel, info in files.items():
        p = present.get(rel)
        if p is None:
            return f"file {rel} is missing"
        size = p.stat().st_size
        if size != info["size"]:
            return f"file {rel} has {size} bytes, the manifest says {info['size']} (truncated or corrupt)"
        if _file_sha256(p) != info["sha256"]:
            return f"file {rel}: SHA-256 mismatch (corrupt or modified)"
    return None


def _reject(out: Path, s: int, why: str, quarantine: bool) -> str:
    """Move step `s` to `out/rejected/` (with `quarantine`); the message saying so."""
    d = out / str(s)
    msg = f"checkpoint {d} rejected: {why}"
    if quarantine:
        dest = out / "rejected" / str(s)
        n = 1
        while dest.exists():
            dest, n = out / "rejected" / f"{s}-{n}", n + 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(d), str(dest))
        msg += f"; moved to {dest}"
    return msg


def quarantine_unverified(out: str | Path, log: Log = _stderr) -> None:
    """Move the steps newer than the newest one that verifies to `out/rejected/`.

    A multi-process run does this on process 0 before every process restores (orbax restores
    collectively, so all processes must then pick the same step).
    """
    out = Path(out)
    for s in reversed(checkpoint_steps(out)):
        why = verify_files(out / str(s))
        if why is None:
            return
        log(_reject(out, s, why, True))


@dataclass
class Checkpoint:
    """A verified checkpoint."""

    path: Path
    step: int
    params: llama.Params
    opt_state: Any
    meta: dict

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_json(self.meta["train_config"])

    @property
    def cfg(self) -> ModelConfig:
        return model_config_from_json(self.meta["model_config"])


def _restore_step(step_dir: Path, opt_target_fn: Callable | None):
    """Restore a step's items onto this process's first device, whatever mesh they were saved from.

    Targets with explicit single-device shardings are given, so that a checkpoint written by a
    data-parallel or multi-process run loads in one process (and vice versa).
    """
    import orbax.checkpoint as ocp

    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    as_local = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype, sharding=local), tree)
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta", args=ocp.args.JsonRestore())
    with ocp.StandardCheckpointer() as ckptr:
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns that a per-item metadata file it does not need is absent
        try:
            md = ckptr.metadata(step_dir / "params")
        finally:
            absl.setLevel(level)
        tree = getattr(getattr(md, "item_metadata", md), "tree", md)  # StepMetadata in newer orbax versions
        params = ckptr.restore(step_dir / "params", as_local(tree))
        opt_state = None
        if opt_target_fn is not None:
            opt_state = ckptr.restore(step_dir / "opt_state", as_local(opt_target_fn(params)))
    # uncommitted arrays (as freshly created ones are), so that callers may place them on any mesh
    uncommitted = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), t)  # noqa: E731
    return uncommitted(params), None if opt_state is None else uncommitted(opt_state), meta


def load_checkpoint(out: str | Path, *, opt_target_fn: Callable | None = None, step: int | None = None,
                    quarantine: bool = False, log: Log = _stderr) -> Checkpoint:
    """The newest checkpoint under `out` that verifies (or exactly `step`).

    Every rejected step is reported through `log` with its reason; with `quarantine` it is
    moved to `out/rejected/` (training does this so the step can be written again).
    `opt_target_fn(params)` gives the optimizer-state structure to restore (None: skip it).
    Raises NoGoodCheckpoint when no checkpoint verifies, CheckpointError when one verifies
    but cannot be restored (never silently skipped: its files are intact).
    """
    out = Path(out)
    if not out.is_dir():
        raise CheckpointError(f"checkpoint directory {str(out)!r} does not exist")
    steps = checkpoint_steps(out)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{out} has no checkpoint for step {step} (steps: {steps or 'none'})")
        steps = [step]
    if not steps:
        raise CheckpointError(f"{out} holds no checkpoints")
    rejected = []
    for s in reversed(steps):
        d = out / str(s)
        why = verify_files(d)
        if why is None:
            # The files are the ones that were saved: a failure from here on is not corruption
            # (another orbax/JAX version, a bug) and must not discard the checkpoint.
            try:
                params, opt_state, meta = _restore_step(d.resolve(), opt_target_fn)
            except Exception as e:  # noqa: BLE001 - reported as one line
                first = str(e).splitlines()[0] if str(e) else ""
                raise CheckpointError(f"checkpoint {d} verifies against its manifest but cannot be restored "
                                      f"({type(e).__name__}: {first})") from e
            manifest = json.loads((d / MANIFEST).read_text())
            if tree_sha256(params) != manifest["arrays_sha256"]["params"] or (
                    opt_state is not None and tree_sha256(opt_state) != manifest["arrays_sha256"]["opt_state"]):
                raise CheckpointError(f"checkpoint {d}: its files verify but the restored arrays do not match the "
                                      "manifest's SHA-256 (a different orbax/JAX version?)")
            if meta.get("format") != FORMAT or meta.get("step") != s:
                raise CheckpointError(f"checkpoint {d}: metadata is not a {FORMAT} checkpoint of step {s}")
            if rejected:
                log(f"using checkpoint {d} (step {s}) instead")
            return Checkpoint(d, s, params, opt_state, meta)
        log(_reject(out, s, why, quarantine))
        rejected.append(s)
    raise NoGoodCheckpoint(f"no checkpoint under {out} verifies (rejected steps: {', '.join(map(str, rejected))})")


class CheckpointWriter:
    """Saves steps with orbax's CheckpointManager and seals each with a manifest."""

    def __init__(self, out: str | Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.out = Path(out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                            cleanup_tmp_directories=True)
        self.mngr = ocp.CheckpointManager(self.out, options=opts, item_names=("params", "opt_state", "meta"))

    def save(self, step: int, params, opt_state, meta: dict) -> Path:
        """Every process calls this (orbax saves collectively); process 0 writes the manifest."""
        ocp = self.ocp
        d = self.out / str(step)
        self.mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                     opt_state=ocp.args.StandardSave(opt_state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
        self.mngr.wait_until_finished()
        if jax.process_index() != 0:
            _barrier(f"manifest {step}")
            return d
        manifest = {"format": FORMAT, "step": step,
                    "files": {rel: {"size": p.stat().st_size, "sha256": _file_sha256(p)}
                              for rel, p in _step_files(d).items()},
                    "arrays_sha256": {"params": tree_sha256(params), "opt_state": tree_sha256(opt_state)}}
        tmp = d / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / MANIFEST)
        _barrier(f"manifest {step}")
        return d

    def close(self) -> None:
        self.mngr.close()


def _barrier(name: str) -> None:
    """All processes wait here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --- the training step ---------------------------------------------------------------------------------

def make_schedule(lr: float, steps: int, warmup: int, kind: str) -> optax.Schedule:
    """Learning rate per step: linear warm-up over `warmup` steps, then constant or cosine to 10% at `steps`."""
    if kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, max(1, steps - warmup), alpha=0.1)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(lr / warmup, lr, warmup), main], [warmup])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    lr = make_schedule(tc.lr, tc.steps, tc.warmup_steps, tc.schedule)
    slr = make_schedule(tc.step_lr if tc.step_lr is not None else tc.lr, tc.steps, tc.warmup_steps, tc.schedule)
    return optim.lsq_optimizer(lr, weight_decay=tc.weight_decay, act_step_lr_mult=tc.act_step_lr_mult,
                               act_step_warmup_steps=tc.act_step_warmup_steps, step_learning_rate=slr,
                               grad_clip=tc.grad_clip)


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood (nats), [B, L]."""
    lp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, targets_BxL[..., None], axis=-1)[..., 0]


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _floor_steps(params):
    def f(path, x):
        return jnp.maximum(x, STEP_FLOOR) if optim.param_group(path, x) in ("weight_steps", "act_steps") else x
    return jax.tree_util.tree_map_with_path(f, params)


_TRAJECTORY_KEYS = ("precision", "steps", "lr", "step_lr", "weight_decay", "warmup_steps", "schedule",
                    "act_step_lr_mult", "act_step_warmup_steps", "grad_clip", "distill", "appliance_cards")


@functools.lru_cache(maxsize=8)
def _train_step(cfg: ModelConfig, opt_key: tuple, mesh: jax.sharding.Mesh | None = None,
                pipeline: tuple | None = None) -> Callable:
    """The jitted optimizer step (cached per model config, optimizer settings and meshes).

    `pipeline`: (CardLayout, card mesh) to run the model's forward through the card pipeline.
    """
    tc = TrainConfig(**dict(opt_key))
    policy, distill = tc.precision, tc.distill
    tx = make_optimizer(tc)
    if pipeline is None:
        forward = lambda params, x: llama.forward(params, x, cfg, policy)  # noqa: E731
    else:
        from models.appliance import pipelined_logits

        forward = lambda params, x: pipelined_logits(params, x, cfg, policy, *pipeline)  # noqa: E731

    def loss_fn(params, teacher, toks_BxL1):
        x, y = toks_BxL1[:, :-1], toks_BxL1[:, 1:]
        logits = forward(params, x)
        ce = token_nll(logits, y).mean()
        if not distill:
            return ce, ce
        t_lp = jax.nn.log_softmax(jax.lax.stop_gradient(llama.forward(teacher, x, cfg, "float")), axis=-1)
        lp = jax.nn.log_softmax(logits, axis=-1)
        kl = jnp.sum(jnp.exp(t_lp) * (t_lp - lp), axis=-1).mean()
        return (1.0 - distill) * ce + distill * kl, ce

    def step(params, opt_state, teacher, toks_AxBxL1):
        def micro(carry, toks):
            g_acc, l_acc, ce_acc = carry
            (l, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(params, teacher, toks)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, ce_acc + ce), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (g, l, ce), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), toks_AxBxL1)
        n = toks_AxBxL1.shape[0]
        g = jax.tree.map(lambda a: a / n, g)
        updates, opt_state = tx.update(g, opt_state, params)
        params = _floor_steps(optax.apply_updates(params, updates))
        return params, opt_state, {"loss": l / n, "ce": ce / n, "grad_norm": _global_norm(g)}

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    # data parallel: everything but the batch is replicated, so is everything that comes out
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=jax.sharding.NamedSharding(mesh, P()))


def train_step_fn(cfg: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh | None = None,
                  devices: int | None = None) -> Callable:
    """`step(params, opt_state, teacher, tokens [A, B, L+1]) -> (params, opt_state, metrics)`.

    `params` and `opt_state` are donated; `teacher` (float parameters) is used only when
    `tc.distill > 0` (pass None otherwise). With a data `mesh`, pass replicated parameters and
    tokens sharded over B (see `train`). With `tc.appliance_cards`, the forward runs through
    the card pipeline over `devices` devices (see `appliance_pipeline`).
    """
    pipeline = appliance_pipeline(cfg, tc, devices) if tc.appliance_cards else None
    return _train_step(cfg, tuple((k, getattr(tc, k)) for k in _TRAJECTORY_KEYS), mesh, pipeline)


def appliance_pipeline(cfg: ModelConfig, tc: TrainConfig, devices: int | None = None) -> tuple:
    """(CardLayout, card mesh) for training through the appliance pipeline.

    `tc.appliance_cards` cards: near-equal layer blocks, the output layer split over two cards
    (as in the paper), one sequence per micro-batch (`batch_size` micro-batches). The cards are
    spread over `devices` devices (default: one per card if there are enough, else one device).
    """
    from models.appliance import CardLayout
    from np_jax.pipeline import card_mesh

    cards = tc.appliance_cards
    layout = CardLayout.simple(cfg, cards, micro_batches=tc.batch_size, head_cards=2)
    n = devices or (cards if len(jax.devices()) >= cards else 1)
    if cards % n:
        raise ValueError(f"{cards} appliance cards cannot be split evenly over {n} devices")
    return layout, card_mesh(n)


def data_mesh(devices: int | None = None) -> jax.sharding.Mesh | None:
    """The 1-D "data" mesh of a data-parallel run; None for one device.

    One process: the first `devices` local devices (default 1). Several processes: every
    device of every process (`devices`, if given, must say so).
    """
    devs = jax.devices()
    if jax.process_count() > 1:
        if devices not in (None, len(devs)):
            raise ValueError(f"a multi-process run trains on all {len(devs)} devices of its "
                             f"{jax.process_count()} processes, not {devices}")
        n = len(devs)
    else:
        n = devices or 1
        if not 1 <= n <= len(devs):
            raise ValueError(f"--devices {n}: this process has {len(devs)} {devs[0].platform} device(s) "
                             "(on CPU, ask for more virtual devices before JAX starts)")
    return None if n == 1 else jax.sharding.Mesh(np.array(devs[:n]), ("data",))


# --- the loop --------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    params: llama.Params
    step: int
    cfg: ModelConfig
    metrics: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    tokens: int = 0
    resumed_from: int | None = None
    checkpoint: Path | None = None


def read_metrics(path: Path, upto: int) -> list[dict]:
    """The rows of a run's metrics.jsonl for steps <= `upto` (a line cut by an interruption is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption
            if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= upto:
                rows.append(r)
    return rows


def train(tc: TrainConfig, *, stop_after: int | None = None, progress: bool | None = None,
          log: Log = _stderr, devices: int | None = None) -> TrainResult:
    """Run (or resume) the training run `tc`; returns the parameters after the last step run.

    Resumes from the newest verified checkpoint under `tc.out` (its settings must match, see
    `TrainConfig.differences`). `stop_after=k` returns right after step k without saving, as a
    process killed at that point would (for tests). `progress`: tqdm bar (None: only on a terminal).
    `devices`: data-parallel over this many local devices (a multi-process run uses all devices);
    with `tc.appliance_cards`, the devices the cards are spread over instead.
    """
    from tqdm import tqdm

    mesh = None if tc.appliance_cards else data_mesh(devices)
    if tc.appliance_cards and jax.process_count() > 1:
        raise ValueError("training through the appliance pipeline runs in one process")
    if mesh is not None and tc.batch_size % mesh.size:
        raise ValueError(f"--batch-size {tc.batch_size} must be a multiple of the {mesh.size} data-parallel devices")
    lead = jax.process_index() == 0
    if not lead:
        log = lambda msg: None  # noqa: E731 - one voice per run
        progress = False
    out = Path(tc.out)
    base = load_model(tc.model, tc.gguf, tc.seed, tc.init_from, log=log)
    cfg, policy = base.cfg, get_policy(tc.precision)
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq-len {tc.seq_len} exceeds the context of {cfg.name} ({cfg.max_seq_len})")
    corpus = Corpus(tc.data, base.encoder)
    stream = TrainStream(corpus, tc.seq_len, tc.batch_size, tc.grad_accum, tc.seed)
    tx = make_optimizer(tc)
    teacher = base.params if tc.distill else None

    start, resumed_from, elapsed0, metrics = 0, None, 0.0, []
    ck = None
    if checkpoint_steps(out):
        if jax.process_count() > 1:  # process 0 sets rejected steps aside, then all restore the same step
            if lead:
                quarantine_unverified(out, log)
            _barrier("checkpoints verified")
        try:
            ck = load_checkpoint(out, opt_target_fn=lambda p: jax.eval_shape(tx.init, p), quarantine=lead, log=log)
        except NoGoodCheckpoint as e:
            log(f"{e}; starting from step 0")
    if ck is not None:
        diff = tc.differences(ck.train_config)
        if diff:
            raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}); "
                             "use another output directory or remove it")
        if ck.cfg != cfg:
            raise ValueError(f"{out} holds a checkpoint of another model ({ck.cfg.name})")
        params, opt_state, start, resumed_from = ck.params, ck.opt_state, ck.step, ck.step
        elapsed0 = float(ck.meta.get("elapsed_s", 0.0))
        metrics = read_metrics(out / "metrics.jsonl", start)
        log(f"resuming {out} from step {start} ({ck.path})")
    else:
        params = base.params
        if not policy.is_float:
            t0 = time.perf_counter()
            params = llama.calibrate(params, jnp.asarray(stream.calibration(tc.calib_windows)), cfg, policy,
                                     tc.calibration)
            log(f"calibrated {policy.name} step sizes ({tc.calibration}) on {tc.calib_windows} windows "
                f"in {time.perf_counter() - t0:.1f} s")
        params = jax.tree.map(jnp.array, params)  # own copies: the step donates them (the teacher keeps the base)
        opt_state = tx.init(params)
    if mesh is not None:
        repl, batch_sharding = (jax.sharding.NamedSharding(mesh, spec) for spec in (P(), P(None, "data", None)))
        params, opt_state, teacher = (None if t is None else jax.tree.map(lambda x: to_global(to_host(x), repl), t)
                                      for t in (params, opt_state, teacher))
    if start >= tc.steps:
        log(f"{out} is already at step {start} (of {tc.steps})")
        return TrainResult(params, start, cfg, metrics, elapsed0, start * tc.tokens_per_step, resumed_from,
                           ck.path if ck else None)

    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.jsonl"
    if lead:
        mpath.write_text("".join(json.dumps(r) + "\n" for r in metrics))
    writer = CheckpointWriter(out, tc.keep)
    step_fn = train_step_fn(cfg, tc, mesh, devices if tc.appliance_cards else None)
    lr_at = make_schedule(tc.lr, tc.steps, tc.warmup_steps, tc.schedule)
    log(f"training {cfg.name} ({base.source}) at {policy.name}: steps {start + 1}-{tc.steps}, "
        f"{tc.grad_accum} x {tc.batch_size} x {tc.seq_len} = {tc.tokens_per_step} tokens/step; "
        f"data {corpus.describe()}" + (f"; data parallel over {mesh.size} devices" if mesh is not None else "")
        + (f"; through the {tc.appliance_cards}-card appliance pipeline" if tc.appliance_cards else ""))
    bar = tqdm(total=tc.steps, initial=start, desc=f"train {policy.name}", unit="step", file=sys.stderr,
               disable=(None if progress is None else not progress), dynamic_ncols=True)
    elapsed, last_ckpt = elapsed0, None
    try:
        with open(mpath if lead else os.devnull, "a") as mfile:
            for step in range(start, tc.steps):
                toks = stream.batch(step)
                toks = jnp.asarray(toks) if mesh is None else to_global(toks, batch_sharding)
                t0 = time.perf_counter()
                params, opt_state, m = step_fn(params, opt_state, teacher, toks)
                m = {k: float(to_host(v)) for k, v in m.items()}  # waits for the step
                dt = time.perf_counter() - t0
                elapsed += dt
                done = step + 1
                row = {"step": done, **m, "lr": float(lr_at(step)), "tokens": done * tc.tokens_per_step,
                       "step_s": dt, "elapsed_s": elapsed, "tokens_per_s": tc.tokens_per_step / dt}
                metrics.append(row)
                mfile.write(json.dumps(row) + "\n")
                mfile.flush()
                if not math.isfinite(m["loss"]):
                    raise ValueError(f"loss is {m['loss']} at step {done}; lower the learning rate")
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if bar.disable and (done % tc.log_every == 0 or done == tc.steps or done == start + 1):
                    log(f"step {done}/{tc.steps} loss {m['loss']:.4f} ce {m['ce']:.4f} "
                        f"{row['tokens_per_s']:.0f} tokens/s, {elapsed / 60:.1f} min")
                if stop_after is not None and done >= stop_after:
                    break
                if done % tc.save_every == 0 or done == tc.steps:
                    meta = {"format": FORMAT, "step": done, "train_config": tc.to_json(),
                            "model_config": dataclasses.asdict(cfg), "source": base.source,
                            "precision": policy.name, "elapsed_s": elapsed, "tokens": done * tc.tokens_per_step,
                            "data": corpus.describe(), "loss": m["loss"]}
                    last_ckpt = writer.save(done, params, opt_state, meta)
    finally:
        bar.close()
        writer.close()
    return TrainResult(params, done, cfg, metrics, elapsed, done * tc.tokens_per_step, resumed_from, last_ckpt)


# --- evaluation ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _nll_fn(cfg: ModelConfig, policy: str) -> Callable:
    def f(params, toks_BxL1):
        return token_nll(llama.forward(params, toks_BxL1[:, :-1], cfg, policy), toks_BxL1[:, 1:]).sum(-1)
    return jax.jit(f)


def evaluate(params: llama.Params, cfg: ModelConfig, policy: str, windows_NxL1: np.ndarray,
             batch_size: int = 4) -> dict:
    """Mean next-token NLL (nats/token) and perplexity exp(NLL) over every target of the windows."""
    policy = get_policy(policy).name
    windows_NxL1 = np.asarray(windows_NxL1, np.int32)
    n = len(windows_NxL1)
    b = max(1, min(batch_size, n))
    f = _nll_fn(cfg, policy)
    total = 0.0
    for i in range(0, n, b):
        chunk = windows_NxL1[i: i + b]
        pad = b - len(chunk)
        if pad:  # keep one compiled shape; padded rows are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
        total += float(np.asarray(f(params, jnp.asarray(chunk)), np.float64)[: b - pad].sum())
    tokens = n * (windows_NxL1.shape[1] - 1)
    nll = total / tokens
    return {"nll": nll, "perplexity": float(math.exp(min(nll, 700.0))), "tokens": tokens}


def plot_loss(metrics: list[dict], path: str | Path, title: str = "", smooth: int = 10,
              evals: dict[str, float] | None = None) -> Path:
    """Training loss vs step (raw and a moving average) as a small PNG; `evals`: horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        raise ValueError("no training metrics to plot")
    steps = np.array([r["step"] for r in metrics])
    loss = np.array([r["ce"] for r in metrics])
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, color="C0", label="training cross-entropy (per step)")
    if len(loss) >= smooth > 1:
        k = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(loss, k, "valid"), lw=1.8, color="C0", label=f"{smooth}-step mean")
    for i, (name, v) in enumerate((evals or {}).items()):
        ax.axhline(v, ls="--", lw=1, color=f"C{i + 1}", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats/token")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def held_out(encoder: Encoder, data: DataConfig, seq_len: int, n_windows: int) -> tuple[np.ndarray, dict]:
    """Held-out windows and a description of the corpus they come from."""
    corpus = Corpus(data, encoder)
    w = held_out_windows(corpus, seq_len, n_windows)
    return w, corpus.describe()
