"""LLMs on the emulated NorthPole: a Granite/Llama-family decoder whose products run as the chip's
integer arithmetic, its quantization recipes, generation, the appliance backend, model files,
training and evaluation.

- `config`: `ModelConfig` (one record for named configs and GGUF hyper-parameters), `CONFIGS`,
  `get_config`, `named_configs` (the `np_jax.models` entry point).
- `llama`: the decoder (parameters, `layer`, `forward`, calibration, serving form, KV cache,
  `step`), used as a module: `from models import llama`.
- `recipe`: quantization recipes (`Recipe`, `RECIPES`, `DEFAULT_RECIPE`, `get_recipe`);
  `prepared`: the on-disk cache of prepared models (`prepare`); `sensitivity`: the per-layer
  8-to-4-bit sensitivity table (`np-jax sensitivity`); `search`: per-layer widths chosen from a measured
  loss table and the cost model (`np-jax search`).
- `generate`: `Generator` (one generation loop over a backend), `Sequential`,
  `GenerationResult`, `bucket_length`.
- `appliance`: the decoder on the emulated appliance (`Appliance`, `build_cards`, `card_list`,
  `card_programs`, `init_card_states`, `pipelined_logits`, `combine_greedy`, ...).
- subpackages `io` (model files, tokenizer), `train`, `evaluate`.

Names are imported on first use, so that `import models.config` (which every `np-jax` command
reads through its entry points) does not load JAX and the model.
"""

import importlib
import sys


def _lazy(package: str, exports: dict[str, str]):
    """Module `__getattr__` and `__dir__` for `package`: each name of `exports` (name -> module)
    is imported from its module on first use; a name that is its module's own last component is
    that module."""
    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        value = module if exports[name] == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


_EXPORTS = {
    **{m: f"models.{m}" for m in ("appliance", "config", "evaluate", "generate", "io", "llama", "prepared", "recipe",
                                  "search", "sensitivity", "train")},
    **dict.fromkeys(("Appliance", "build_cards", "card_list", "card_precision", "card_programs", "combine_greedy",
                     "init_card_states", "pipelined_logits", "schedule_of"), "models.appliance"),
    **dict.fromkeys(("CONFIGS", "ModelConfig", "get_config", "named_configs"), "models.config"),
    **dict.fromkeys(("GenerationResult", "Generator", "Sequential", "bucket_length"), "models.generate"),
    **dict.fromkeys(("prepare",), "models.prepared"),
    **dict.fromkeys(("DEFAULT_RECIPE", "RECIPES", "Recipe", "get_recipe"), "models.recipe"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy(__name__, _EXPORTS)
