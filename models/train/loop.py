"""The training loop: float fine-tuning and LSQ quantization-aware training (QAT).

One loop serves both: the model's forward is `llama.forward(params, tokens, cfg, policy)`, the
same integer forward that serves on the emulated chip; for a quantized policy its custom VJPs
give the LSQ gradients (weights, weight steps and activation steps all learn). The optimizer is
`np_jax.quant.optim.lsq_optimizer` (AdamW for weights, Adam for step sizes, the 200x warm start of
the activation steps).

QAT starts from float parameters (SmolLM2-135M from its GGUF file, a named config from random
init, or the newest checkpoint of a float run, `init_from`), whose step sizes are first
calibrated on training windows (`calibration`: "mse", much better without QAT and the default
here, or "lsq", the paper's initialisation). Optionally the loss distils the float model
(`distill` in [0, 1]: weight of KL(float teacher || student), the rest is next-token CE).

Determinism: there is no dropout; the data order is a pure function of (seed, step)
(models.train.data.TrainStream) and the CPU computation is deterministic, so a run interrupted at any
step and resumed from its last checkpoint ends with bit-identical parameters.

Checkpoints (orbax `CheckpointManager`, one directory per step under `out/`): items `params`,
`opt_state` (standard pytrees) and `meta` (JSON: settings, model config, step, tokens, wall
time). After orbax finalizes a step, `np_jax_manifest.json` is written into the step
directory (atomically, last): the size and SHA-256 of every file of the step and a SHA-256 of
the restored arrays. A step without a manifest is incomplete (interrupted while saving);
any size or hash mismatch, unreadable file or failing restore marks it corrupt. Loading takes
the newest step that verifies and reports each rejected one with the reason; when resuming
training, rejected steps are moved to `out/rejected/` so the run can write those steps again.

Validation (`eval_every` > 0): at the start and every `eval_every` steps (and the last), the
model is evaluated on `eval_windows` held-out windows, read from the last held-out file
backwards (evaluation reads from the first on, so choosing a step by them does not choose it by
`np-jax eval`'s windows): perplexity, its ratio to the
float base's on the same windows, KL(float base || model) and top-1 agreement with the float
base (the float base: the model QAT started from, in the recipe's coordinates, exact in float;
for float training the starting model). Each result is a line of `out/validation.jsonl` and of
the log. With `keep_best` ("kl" or "perplexity") the step with the lowest value so far is also
saved, as a checkpoint like any other, under `out/best/` (the newest step there is the best);
it survives resumption (its steps past the resumed step are removed and found again).

Data parallelism (`train(tc, devices=N)`, and always in a multi-process run, see
`np_jax.appliance.distributed`): the parameters and optimizer state are replicated over a 1-D "data"
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
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from models import llama, recipe as recipes
from models.config import ModelConfig
from models.appliance import pipelined_logits, schedule_of
from models.evaluate.perplexity import evaluate, token_nll
from models.io.load import Model, load_model, model_encoder
from models.train.checkpoint import (FORMAT, CheckpointWriter, NoGoodCheckpoint, RunLock, barrier,
                                     checkpoint_steps, load_checkpoint, newest_meta, quarantine_unverified)
from models.train.config import TrainConfig
from models.train.data import Corpus, TrainStream, held_out_windows
from np_jax.appliance.distributed import to_global, to_host
from np_jax.appliance.mapping import map_model
from np_jax.appliance.pipeline import card_mesh
from np_jax.quant import get_policy, optim

STEP_FLOOR = 1e-8  # step sizes are kept >= this after every update (same floor as quant.init_step)
BEST = "best"  # the folder of a run that holds its best validated step (`TrainConfig.keep_best`)
VALIDATION = "validation.jsonl"
VALIDATION_BATCH = 4  # held-out windows per validation forward

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_base(model: str, gguf: str | None = None, seed: int = 0, init_from: str | None = None,
              log: Log = _stderr) -> Model:
    """The model a run starts from: `init_from`'s newest good checkpoint, else `load_model`."""
    if init_from:
        ck = load_checkpoint(init_from, log=log)
        tc = ck.train_config
        return Model(ck.cfg, ck.params, model_encoder(tc.model, tc.gguf, ck.cfg),
                     f"checkpoint {ck.path} (step {ck.step}, {tc.precision})")
    return load_model(model, gguf, seed=seed, log=log)


def run_config(base_cfg: ModelConfig, tc: TrainConfig) -> ModelConfig:
    """The model config a run trains: the base's for float runs (and for a base that a recipe has
    already transformed), else the config `tc.recipe` makes of it."""
    if get_policy(tc.precision).is_float or base_cfg.transformed:
        return base_cfg
    return recipes.transformed_config(base_cfg, tc.quant_recipe(), tc.precision)


def start_params(base: Model, tc: TrainConfig, log: Log = _stderr) -> llama.Params:
    """QAT's starting point: `base` prepared by the run's recipe at its precision, calibrated on
    the run's training split (cached per GGUF file as `np-jax run` and `np-jax eval` cache it);
    a base the recipe has already transformed (a QAT checkpoint) is only re-calibrated."""
    from models.prepared import calibration_windows, prepare

    recipe = tc.quant_recipe()
    if base.cfg.transformed:
        t0 = time.perf_counter()
        windows = calibration_windows(base, recipe.calib_windows, tc.data, tc.seed)
        params = llama.calibrate(base.params, jnp.asarray(windows), base.cfg, tc.precision, recipe.activations)
        log(f"calibrated {tc.precision} step sizes ({recipe.activations}) of the transformed base on "
            f"{recipe.calib_windows} windows in {time.perf_counter() - t0:.1f} s")
        return params
    cfg, params, info = prepare(base, recipe, tc.precision, data=tc.data, seed=tc.seed, log=log)
    if cfg != run_config(base.cfg, tc):
        raise ValueError(f"the prepared model's config differs from the run's ({info['cache']})")
    return params


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
                               relative_steps=tc.step_lr_mode == "relative", grad_clip=tc.grad_clip)


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _floor_steps(params):
    def f(path, x):
        return jnp.maximum(x, STEP_FLOOR) if optim.param_group(path, x) in ("weight_steps", "act_steps") else x
    return jax.tree_util.tree_map_with_path(f, params)


def _saved_config(meta: dict | None) -> TrainConfig | None:
    """The settings in a step's metadata read without restoring it (None if unreadable: loading the
    step verifies it and says why)."""
    try:
        return TrainConfig.from_json(meta["train_config"]) if meta else None
    except (KeyError, TypeError, ValueError):
        return None


def _refuse_other_settings(tc: TrainConfig, saved: TrainConfig | None, out: Path) -> None:
    """Raise (ValueError) if the run saved in `out` was made with settings that change the trajectory."""
    diff = tc.differences(saved) if saved is not None else []
    if diff:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}); "
                         "use another output directory or remove it")


_TRAJECTORY_KEYS = ("precision", "steps", "lr", "step_lr", "step_lr_mode", "weight_decay", "warmup_steps",
                    "schedule", "act_step_lr_mult", "act_step_warmup_steps", "grad_clip", "distill", "appliance_cards")


@functools.lru_cache(maxsize=8)
def _train_step(cfg: ModelConfig, opt_key: tuple, mesh: jax.sharding.Mesh | None = None,
                pipeline: tuple | None = None) -> Callable:
    """The jitted optimizer step (cached per model config, optimizer settings and meshes).

    `pipeline`: (cards, micro-batches, sequence length, devices) to run the model's forward
    through the card pipeline (`appliance_pipeline`).
    """
    tc = TrainConfig(**dict(opt_key))
    policy, distill = tc.precision, tc.distill
    tx = make_optimizer(tc)
    if pipeline is None:
        forward = lambda params, x: llama.forward(params, x, cfg, policy)  # noqa: E731
    else:
        mapping, card_mesh_ = appliance_pipeline(cfg, policy, *pipeline)
        forward = lambda params, x: pipelined_logits(params, x, cfg, policy, mapping, card_mesh_)  # noqa: E731

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
    pipeline = (tc.appliance_cards, tc.batch_size, tc.seq_len, devices) if tc.appliance_cards else None
    return _train_step(cfg, tuple((k, getattr(tc, k)) for k in _TRAJECTORY_KEYS), mesh, pipeline)


def appliance_pipeline(cfg: ModelConfig, policy, cards: int, micro_batches: int, seq_len: int,
                       devices: int | None = None) -> tuple:
    """(Mapping, card mesh) for training through the appliance pipeline.

    `cards` cards mapped by `map_model`: near-equal layer blocks, the output layer split over two
    cards (as in the paper), one sequence per micro-batch. The active cards are spread over
    `devices` devices (default: one per card if there are enough, else one device).
    """
    mapping = map_model(cfg, policy, users=micro_batches, context=seq_len, cards=cards, micro_batches=micro_batches,
                        output_cards=2, strict=False)
    n_cards = schedule_of(mapping).n_cards
    n = devices or (n_cards if len(jax.devices()) >= n_cards else 1)
    if n_cards % n:
        raise ValueError(f"{n_cards} appliance cards cannot be split evenly over {n} devices")
    return mapping, card_mesh(n)


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


def run_directory(checkpoints: str | Path) -> Path:
    """The run folder of a folder of checkpoints: itself, or the run's for its `best` folder."""
    p = Path(checkpoints)
    return p.parent if p.name == BEST and (p.parent / "metrics.jsonl").is_file() else p


class Validator:
    """`validator(params) -> dict`: the held-out validation of `TrainConfig.eval_every` (see the
    module docstring). The float `reference` runs once, at the first call."""

    def __init__(self, reference: llama.Params, corpus: Corpus, cfg: ModelConfig, tc: TrainConfig):
        # from the last held-out file backwards: np-jax eval's windows come from the first on
        self.windows = held_out_windows(corpus, tc.seq_len, tc.eval_windows, from_end=True)
        self.cfg, self.policy, self.reference = cfg, get_policy(tc.precision), reference
        self.float: dict | None = None

    def __call__(self, params: llama.Params) -> dict:
        if self.float is None:
            self.float = evaluate(self.reference, self.cfg, "float", self.windows, VALIDATION_BATCH)
        r = evaluate(params, self.cfg, self.policy, self.windows, VALIDATION_BATCH, reference_top1=self.float["top1"],
                     reference_params=self.reference, reference_cfg=self.cfg)
        return {"perplexity": r["perplexity"], "vs_float": r["perplexity"] / self.float["perplexity"], "kl": r["kl"],
                "top1_agreement": r["top1_agreement"], "nll": r["nll"], "windows": len(self.windows),
                "tokens": r["tokens"]}


def _jsonl_upto(path: Path, rows: list[dict]) -> None:
    """Replace `path` with `rows`, one JSON object a line (a temporary file renamed: never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


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
    validation: list[dict] = field(default_factory=list)  # rows of out/validation.jsonl, this run's steps
    best: dict | None = None  # the best validated step kept (`keep_best`): step, by, value, checkpoint


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
    if jax.process_index() != 0:  # orbax saves collectively; process 0 holds the run's lock
        return _train(tc, stop_after=stop_after, progress=progress, log=log, devices=devices)
    with RunLock(tc.out, log):
        return _train(tc, stop_after=stop_after, progress=progress, log=log, devices=devices)


def _train(tc: TrainConfig, *, stop_after: int | None, progress: bool | None, log: Log,
           devices: int | None) -> TrainResult:
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
    base = load_base(tc.model, tc.gguf, tc.seed, tc.init_from, log=log)
    cfg, policy = run_config(base.cfg, tc), get_policy(tc.precision)
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq-len {tc.seq_len} exceeds the context of {cfg.name} ({cfg.max_seq_len})")
    corpus = Corpus(tc.data, base.encoder)
    stream = TrainStream(corpus, tc.seq_len, tc.batch_size, tc.grad_accum, tc.seed)
    tx = make_optimizer(tc)
    teacher = None
    if tc.distill or tc.eval_every:
        # the float model in the student's coordinates (the recipe's transforms are exact in float)
        teacher = base.params if cfg == base.cfg else recipes.transform(base.params, base.cfg, tc.quant_recipe(),
                                                                        policy)[1]
    validator = Validator(teacher, corpus, cfg, tc) if tc.eval_every else None
    if not tc.distill:
        teacher = None  # the step does not use it

    start, resumed_from, elapsed0, metrics = 0, None, 0.0, []
    ck = None
    if checkpoint_steps(out):
        # other settings are refused before restoring: another optimizer's state has another structure
        _refuse_other_settings(tc, _saved_config(newest_meta(out)), out)
        if jax.process_count() > 1:  # process 0 sets rejected steps aside, then all restore the same step
            if lead:
                quarantine_unverified(out, log)
            barrier("checkpoints verified")
        try:
            ck = load_checkpoint(out, opt_target_fn=lambda p: jax.eval_shape(tx.init, p), quarantine=lead, log=log)
        except NoGoodCheckpoint as e:
            log(f"{e}; starting from step 0")
    if ck is not None:
        _refuse_other_settings(tc, ck.train_config, out)
        if ck.cfg != cfg:
            raise ValueError(f"{out} holds a checkpoint of another model ({ck.cfg.name})")
        params, opt_state, start, resumed_from = ck.params, ck.opt_state, ck.step, ck.step
        elapsed0 = float(ck.meta.get("elapsed_s", 0.0))
        metrics = read_metrics(out / "metrics.jsonl", start)
        log(f"resuming {out} from step {start} ({ck.path})")
    else:
        params = base.params
        if not policy.is_float:
            params = start_params(base, tc, log)
        params = jax.tree.map(jnp.array, params)  # own copies: the step donates them (the teacher keeps the base)
        opt_state = tx.init(params)
    if mesh is not None:
        repl, batch_sharding = (jax.sharding.NamedSharding(mesh, spec) for spec in (P(), P(None, "data", None)))
        params, opt_state, teacher = (None if t is None else jax.tree.map(lambda x: to_global(to_host(x), repl), t)
                                      for t in (params, opt_state, teacher))
    # a run (re)started at step 0 validates step 0 again
    validation = read_metrics(out / VALIDATION, start) if validator and start else []
    if start >= tc.steps:
        log(f"{out} is already at step {start} (of {tc.steps})")
        return TrainResult(params, start, cfg, metrics, elapsed0, start * tc.tokens_per_step, resumed_from,
                           ck.path if ck else None, validation, _best_kept(out / BEST, tc.keep_best))

    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.jsonl"
    if lead:  # replaced whole (a temporary file renamed): an interruption never leaves it half-written
        _jsonl_upto(mpath, metrics)
        if validator:
            _jsonl_upto(out / VALIDATION, validation)
    best_writer, best = None, None
    if tc.keep_best:
        if lead:  # steps saved after the resumed one are made again, and found best again or not
            for s_ in checkpoint_steps(out / BEST):
                if s_ > start:
                    shutil.rmtree(out / BEST / str(s_), ignore_errors=True)
        if jax.process_count() > 1:
            barrier("best steps pruned")
        best = _best_kept(out / BEST, tc.keep_best)
        best_writer = CheckpointWriter(out / BEST, 1)
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
    good = lambda: last_ckpt or (ck.path if ck else None)  # noqa: E731 - the newest good checkpoint

    def diverged(done: int, what: str) -> ValueError:
        g = good()
        return ValueError(f"step {done}: {what}; stopped without saving it (the last good checkpoint is "
                          f"{g if g else 'none: no step was saved'}); lower the learning rate or --grad-clip")

    def validate(done: int, vfile) -> None:
        nonlocal best
        host = params if mesh is None else jax.tree.map(lambda x: jnp.asarray(to_host(x)), params)
        v = {"step": done, **validator(host)}
        validation.append(v)
        vfile.write(json.dumps(v) + "\n")
        vfile.flush()
        kept = ""
        value = v[tc.keep_best] if best_writer is not None else math.nan
        if math.isfinite(value) and (best is None or value < best["value"]):
            meta = _meta(done, m_last.get("loss")) | {"validation": v}
            best = {"step": done, "by": tc.keep_best, "value": value,
                    "checkpoint": str(best_writer.save(done, params, opt_state, meta))}
            kept = f"; the best so far, kept in {out / BEST}"
        with tqdm.external_write_mode(file=sys.stderr):
            log(f"step {done}/{tc.steps} held-out ({v['windows']} windows): perplexity {v['perplexity']:.3f}, "
                f"{v['vs_float']:.4f}x the float base's, KL {v['kl']:.4f}, top-1 {v['top1_agreement']:.3f}{kept}")

    def _meta(done: int, loss) -> dict:
        return {"format": FORMAT, "step": done, "train_config": tc.to_json(), "model_config": dataclasses.asdict(cfg),
                "source": base.source, "precision": policy.name, "elapsed_s": elapsed,
                "tokens": done * tc.tokens_per_step, "data": corpus.describe(), "loss": loss}

    m_last: dict = {}
    try:
        with open(mpath if lead else os.devnull, "a") as mfile, \
                open(out / VALIDATION if lead and validator else os.devnull, "a") as vfile:
            if validator and start == 0:
                validate(0, vfile)  # the start, for comparison
            for step in range(start, tc.steps):
                toks = stream.batch(step)
                toks = jnp.asarray(toks) if mesh is None else to_global(toks, batch_sharding)
                t0 = time.perf_counter()
                params, opt_state, m = step_fn(params, opt_state, teacher, toks)
                m = m_last = {k: float(to_host(v)) for k, v in m.items()}  # waits for the step
                dt = time.perf_counter() - t0
                elapsed += dt
                done = step + 1
                row = {"step": done, **m, "lr": float(lr_at(step)), "tokens": done * tc.tokens_per_step,
                       "step_s": dt, "elapsed_s": elapsed, "tokens_per_s": tc.tokens_per_step / dt}
                metrics.append(row)
                mfile.write(json.dumps(row) + "\n")
                mfile.flush()
                if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
                    raise diverged(done, f"the loss is {m['loss']}, the gradient norm {m['grad_norm']}")
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if bar.disable and (done % tc.log_every == 0 or done == tc.steps or done == start + 1):
                    log(f"step {done}/{tc.steps} loss {m['loss']:.4f} ce {m['ce']:.4f} "
                        f"{row['tokens_per_s']:.0f} tokens/s, {elapsed / 60:.1f} min")
                if stop_after is not None and done >= stop_after:
                    break
                if validator and (done % tc.eval_every == 0 or done == tc.steps):
                    validate(done, vfile)
                if done % tc.save_every == 0 or done == tc.steps:
                    if not bool(to_host(_all_finite(params))):  # an update can overflow with a finite loss
                        raise diverged(done, f"the update made parameters non-finite (loss {m['loss']:.4f})")
                    last_ckpt = writer.save(done, params, opt_state, _meta(done, m["loss"]))
    finally:
        bar.close()
        writer.close()
        if best_writer is not None:
            best_writer.close()
    return TrainResult(params, done, cfg, metrics, elapsed, done * tc.tokens_per_step, resumed_from, last_ckpt,
                       validation, best)


def _best_kept(best_dir: Path, by: str | None) -> dict | None:
    """The best validated step kept under `best_dir` (its newest), from its metadata; None if none."""
    meta = newest_meta(best_dir) if by else None
    v = (meta or {}).get("validation") or {}
    if by not in v:
        return None
    return {"step": meta["step"], "by": by, "value": v[by], "checkpoint": str(best_dir.resolve() / str(meta["step"]))}
