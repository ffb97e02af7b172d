"""The settings of a training run (`TrainConfig`), saved in every checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from models import llama
from models.io.load import DEFAULT_MODEL
from models.recipe import DEFAULT_RECIPE, with_options
from models.train.data import DataConfig
from np_jax.quant import get_policy


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
    recipe: str = DEFAULT_RECIPE            # how QAT's starting point is made from the float model (models.recipe)
    recipe_options: tuple[str, ...] = ()    # KEY=VALUE fields of that recipe set for this run (recipe.with_options)
    calibration: str = "mse"                # initial step sizes for QAT: mse or lsq
    calib_windows: int | None = None        # training windows the steps are calibrated on (None: the recipe's)
    steps: int = 100
    batch_size: int = 1                     # rows per micro-batch
    grad_accum: int = 4                     # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 1e-4                        # weights (AdamW) and other float parameters (Adam)
    step_lr: float | None = None            # step sizes (default: lr)
    step_lr_mode: str = "absolute"          # step_lr per update in the steps' units, or "relative": times each step
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
    eval_every: int = 0                     # >0: held-out validation at the start and every this many steps
    eval_windows: int = 8                   # held-out windows of seq_len tokens the validation evaluates
    keep_best: str | None = None            # "kl" or "perplexity": keep the best validated step in out/best

    # Settings that do not change the trajectory (may differ when resuming).
    FREE = ("out", "save_every", "keep", "log_every", "eval_every", "eval_windows", "keep_best")
    BEST_BY = ("kl", "perplexity")
    STEP_LR_MODES = ("absolute", "relative")

    def __post_init__(self):
        get_policy(self.precision)
        with_options(self.recipe, self.recipe_options)  # an unknown recipe, key or value fails here
        if self.calibration not in llama.CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose one of {', '.join(llama.CALIBRATIONS)}")
        if self.step_lr_mode not in self.STEP_LR_MODES:
            raise ValueError(f"unknown step-lr mode {self.step_lr_mode!r}; "
                             f"choose one of {', '.join(self.STEP_LR_MODES)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose cosine or constant")
        if self.appliance_cards < 0:
            raise ValueError(f"appliance cards must be >= 0, got {self.appliance_cards}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "keep", "calib_windows", "log_every",
                     "eval_windows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval-every must be >= 0 (0: no validation), got {self.eval_every}")
        if self.keep_best is not None:
            if self.keep_best not in self.BEST_BY:
                raise ValueError(f"unknown keep-best measure {self.keep_best!r}; choose one of {', '.join(self.BEST_BY)}")
            if not self.eval_every:
                raise ValueError("keep-best keeps the best validated step: give --eval-every too")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")
        # `not x > 0` and friends: NaN fails every comparison, so it is refused with the rest
        for name in ("lr", "step_lr", "act_step_lr_mult"):
            v = getattr(self, name)
            if v is not None and not 0 < v < math.inf:
                raise ValueError(f"{name.replace('_', '-')} must be a finite number > 0, got {v}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ValueError(f"grad-clip must be a finite number > 0 (or none: 0 on the command line), "
                             f"got {self.grad_clip}")
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
        d["recipe_options"] = list(self.recipe_options)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["data_dirs"] = tuple(d.get("data_dirs", ()))
        d["recipe_options"] = tuple(d.get("recipe_options", ()))  # runs saved before options: none
        d.setdefault("recipe", "plain")  # runs saved before recipes calibrated the plain way
        d.setdefault("calib_windows", 4)
        return cls(**d)

    def quant_recipe(self):
        """The Recipe that makes QAT's starting point (this run's calibration settings applied)."""
        r = with_options(self.recipe, self.recipe_options)
        return dataclasses.replace(r, activations=self.calibration,
                                   calib_windows=self.calib_windows or r.calib_windows)

    def differences(self, other: "TrainConfig") -> list[str]:
        """Settings that change the trajectory and differ (`steps` only matters for the cosine schedule)."""
        free = set(self.FREE) | ({"steps"} if self.schedule == other.schedule == "constant" else set())
        if get_policy(self.precision).is_float and get_policy(other.precision).is_float:
            free |= {"recipe", "recipe_options", "calibration", "calib_windows"}  # they only make QAT's start
        a, b = self.to_json(), other.to_json()
        return [f"{k}: {b[k]!r} (saved) vs {a[k]!r} (now)" for k in a if k not in free and a[k] != b[k]]
