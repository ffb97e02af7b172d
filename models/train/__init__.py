"""Training: float fine-tuning and LSQ QAT with the same integer forward that serves.

- `config`: `TrainConfig`, everything that defines a run.
- `data`: the corpus (Python source), the file split, the deterministic training stream.
- `checkpoint`: verified orbax checkpoints (SHA-256 manifests), `load_checkpoint`, `RunLock`.
- `loop`: `train` (one device, data parallel, multi-process, through the card pipeline).
"""

from models.train.checkpoint import (FORMAT, MANIFEST, Checkpoint, CheckpointError, CheckpointWriter, NoGoodCheckpoint,
                                     RunLock, checkpoint_steps, load_checkpoint, tree_sha256, verify_files)
from models.train.config import TrainConfig
from models.train.loop import (TrainResult, appliance_pipeline, data_mesh, load_base, make_optimizer, make_schedule,
                               read_metrics, run_config, start_params, train, train_step_fn)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "FORMAT",
    "MANIFEST",
    "NoGoodCheckpoint",
    "RunLock",
    "TrainConfig",
    "TrainResult",
    "appliance_pipeline",
    "checkpoint_steps",
    "data_mesh",
    "load_base",
    "load_checkpoint",
    "make_optimizer",
    "make_schedule",
    "read_metrics",
    "run_config",
    "start_params",
    "train",
    "train_step_fn",
    "tree_sha256",
    "verify_files",
]
