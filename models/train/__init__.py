"""Training: float fine-tuning and LSQ QAT with the same integer forward that serves.

- `config`: `TrainConfig`, everything that defines a run.
- `data`: the corpus of Python source (`DataConfig`, `Corpus`, `list_files`, `split_files`),
  the deterministic training stream `TrainStream`, `held_out_windows`.
- `checkpoint`: verified orbax checkpoints (SHA-256 manifests: `MANIFEST`, `tree_sha256`,
  `verify_files`), `load_checkpoint`, `checkpoint_steps`, `newest_meta`, `CheckpointWriter`,
  the run lock `RunLock` (`LOCK`), `CheckpointError` / `NoGoodCheckpoint`.
- `loop`: `train` (one device, data parallel, multi-process, through the card pipeline:
  `appliance_pipeline`), `TrainResult`, `read_metrics`, held-out validation (`Validator`, kept in
  `VALIDATION`; the best step in the run's `BEST` folder, `run_directory`), and its parts (`load_base`,
  `start_params`, `run_config`, `make_optimizer`, `make_schedule`, `train_step_fn`, `data_mesh`).

Held-out evaluation is `models.evaluate`. Names are imported on first use: the data module
alone (read by `models.evaluate.perplexity`) must not pull in the loop, which imports that
evaluation back.
"""

from models import _lazy

_EXPORTS = {
    **{m: f"models.train.{m}" for m in ("checkpoint", "config", "data", "loop")},
    **dict.fromkeys(("FORMAT", "LOCK", "MANIFEST", "Checkpoint", "CheckpointError", "CheckpointWriter",
                     "NoGoodCheckpoint", "RunLock", "checkpoint_steps", "load_checkpoint", "newest_meta", "tree_sha256",
                     "verify_files"), "models.train.checkpoint"),
    **dict.fromkeys(("TrainConfig",), "models.train.config"),
    **dict.fromkeys(("Corpus", "DataConfig", "TrainStream", "held_out_windows", "list_files", "split_files"),
                    "models.train.data"),
    **dict.fromkeys(("BEST", "TrainResult", "VALIDATION", "Validator", "appliance_pipeline", "data_mesh", "load_base", "make_optimizer", "make_schedule",
                     "read_metrics", "run_config", "run_directory", "start_params", "train", "train_step_fn"),
                    "models.train.loop"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy(__name__, _EXPORTS)
