"""Training checkpoints: orbax step directories sealed with a SHA-256 manifest, verified on load,
and an exclusive lock on the run directory.

A checkpoint (orbax `CheckpointManager`, one directory per step under the run directory) holds
items `params`, `opt_state` (standard pytrees) and `meta` (JSON: settings, model config, step,
tokens, wall time). After orbax finalizes a step, `np_jax_manifest.json` is written into the
step directory (atomically, last): the size and SHA-256 of every file of the step and a SHA-256
of the restored arrays. A step without a manifest is incomplete (interrupted while saving); any
size or hash mismatch, unreadable file or failing restore marks it corrupt. Loading takes the
newest step that verifies and reports each rejected one with the reason; when resuming
training, rejected steps are moved to `rejected/` so the run can write those steps again.

A save is all or nothing: orbax writes into a temporary directory that it renames when complete,
the manifest is written last, and only then are steps beyond `keep` removed (so an interrupted
save never costs an older good checkpoint). A save that fails or is interrupted removes what it
had written; Ctrl-C is held back while a save runs (`np_jax.cli.interrupts_deferred`), and if the
process is ended during one anyway, its temporary files are removed first (`on_forced_exit`).

`RunLock` makes a run directory exclusive: a second `np-jax train` on the same directory is
refused with one line; a lock left by a killed run (its process is gone) is taken over with a
message; a run that ends, however it ends short of being killed, removes its lock file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig
from models.train.config import TrainConfig
from np_jax.appliance.distributed import to_host
from np_jax.cli import interrupts_deferred, on_forced_exit

MANIFEST = "np_jax_manifest.json"
FORMAT = "np_jax.train/1"
LOCK = "np_jax_run.lock"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CheckpointError(ValueError):
    """No usable checkpoint: missing, or one that cannot be read."""


class NoGoodCheckpoint(CheckpointError):
    """Every checkpoint of a run was rejected (corrupt or incomplete)."""


def model_config_from_json(d: dict) -> ModelConfig:
    return ModelConfig(**d)


def tree_sha256(tree) -> str:
    """SHA-256 over every leaf's key path, dtype, shape and bytes (flattening order)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = to_host(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def file_sha256(p: Path) -> str:
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


def newest_meta(out: str | Path) -> dict | None:
    """The metadata (settings, model config) of the newest sealed step under `out`, read without
    restoring arrays or hashing the step's files (only the metadata file's own hash is checked);
    None if there is none. For defaults only: loading verifies the whole step."""
    out = Path(out)
    for s in reversed(checkpoint_steps(out)):
        d = out / str(s)
        try:
            want = json.loads((d / MANIFEST).read_text())["files"]["meta/metadata"]["sha256"]
            if file_sha256(d / "meta" / "metadata") == want:
                return json.loads((d / "meta" / "metadata").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


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
        if file_sha256(p) != info["sha256"]:
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
    """Saves steps with orbax's CheckpointManager, seals each with a manifest, keeps the newest `keep`."""

    def __init__(self, out: str | Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.out = Path(out).resolve()
        self.keep = keep
        self.out.mkdir(parents=True, exist_ok=True)
        # orbax would delete old steps before this writer seals the new one: retention is done here
        opts = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=False,
                                            cleanup_tmp_directories=True)
        self.mngr = ocp.CheckpointManager(self.out, options=opts, item_names=("params", "opt_state", "meta"))
        self._broken = False

    def save(self, step: int, params, opt_state, meta: dict) -> Path:
        """Every process calls this (orbax saves collectively); process 0 writes the manifest.

        All or nothing: on any exception (KeyboardInterrupt included) the step's files are removed
        before it propagates."""
        discard = lambda: self.discard(step)  # noqa: E731
        with on_forced_exit(discard):
            try:
                with interrupts_deferred():
                    d = self._save(step, params, opt_state, meta)
            except BaseException:
                self._broken = True
                if jax.process_index() == 0:
                    discard()
                raise
        self._prune(step)
        return d

    def _save(self, step: int, params, opt_state, meta: dict) -> Path:
        ocp = self.ocp
        d = self.out / str(step)
        self.mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                     opt_state=ocp.args.StandardSave(opt_state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
        self.mngr.wait_until_finished()
        if jax.process_index() != 0:
            barrier(f"manifest {step}")
            return d
        manifest = {"format": FORMAT, "step": step,
                    "files": {rel: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                              for rel, p in _step_files(d).items()},
                    "arrays_sha256": {"params": tree_sha256(params), "opt_state": tree_sha256(opt_state)}}
        tmp = d / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / MANIFEST)
        barrier(f"manifest {step}")
        return d

    def discard(self, step: int) -> None:
        """Remove what a save of `step` left that is not a sealed checkpoint: orbax's temporary
        directory, or the step directory if its manifest was not written."""
        for p in self.out.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)
        d = self.out / str(step)
        if d.is_dir() and not (d / MANIFEST).is_file():
            shutil.rmtree(d, ignore_errors=True)

    def _prune(self, step: int) -> None:
        """Remove all but the newest `keep` steps (once `step` is sealed; process 0)."""
        if jax.process_index() == 0:
            for s in checkpoint_steps(self.out)[:-self.keep]:
                shutil.rmtree(self.out / str(s), ignore_errors=True)
        barrier(f"pruned {step}")

    def close(self) -> None:
        if not self._broken:
            self.mngr.close()
            return
        try:  # after a failed save orbax's state is unknown: release what it can, quietly
            self.mngr.close()
        except Exception:  # noqa: BLE001 - the save's own error is the one reported
            pass


def barrier(name: str) -> None:
    """All processes wait here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class RunLock:
    """An exclusive lock on a run directory while a training run writes to it.

    The lock is an OS file lock (`fcntl.flock`) on `LOCK` in the directory, which the kernel
    releases when the process ends however it ends; the file records who holds it. A second run
    on the same directory is refused with one line; a lock file left by a run that was killed is
    taken over with a message. Releasing removes the file while still holding the lock, so a run
    that locks a file must check that it is still the one at `path` (else it locks the new one).
    """

    def __init__(self, out: str | Path, log: Log = _stderr):
        self.path = Path(out) / LOCK
        self.log = log
        self._fd: int | None = None
        self._forced = None  # the registration of `_remove` for a forced exit

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise ValueError(f"{self.path.parent} is in use by another training run ({holder}); wait for it to "
                                 "finish or use another --out") from None
            if self._is_current(fd):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
        old = self._holder(fd)
        if old:
            self.log(f"taking over the lock of {self.path.parent} left by {old}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        self._fd = fd
        self._forced = on_forced_exit(self._remove)
        self._forced.__enter__()
        return self

    def _is_current(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            d = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"process {d['pid']} on {d['host']}" if d else ""
        except (ValueError, KeyError, OSError):
            return ""

    def _remove(self) -> None:
        """Remove the lock file while still holding the lock (waiting runs then lock a new file)."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self._forced.__exit__(None, None, None)
            self._remove()
            os.close(self._fd)  # closing releases the flock
            self._fd = None
