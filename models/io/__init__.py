"""Model I/O: model files, their tokenizer and the text encoders.

- `gguf`: the defensive GGUF reader and writer (`read_gguf`, `read_gguf_config`, `dequantize_q8_0`,
  `read_gguf_metadata`, `read_gguf_tokenizer_data`, `GGUFModel`, `GGUFTokenizerData`,
  `GGUFError`, `write_llama_gguf`, `permute_qk` / `unpermute_qk`, `smollm2_gguf_path`).
- `weights`: GGUF tensors into the parameter tree (`load_gguf`, `params_from_gguf`,
  `named_config`).
- `tokenizer`: the byte-level BPE tokenizer rebuilt from GGUF metadata (`Tokenizer`,
  `build_tokenizer`, ChatML: `chatml_default_system_prompt`, `IM_START`, `IM_END`).
- `encoders`: the text encoders of the data pipeline and the generator (`Encoder`,
  `ByteEncoder`, `TokenizerEncoder`, `check_text`).
- `load`: `load_model` (a named config or a GGUF file: `Model`), `file_sha256`, `model_name`,
  `model_encoder`, `is_gguf`, `DEFAULT_MODEL`, `KNOWN_SHA256`.

Names are imported on first use: reading a GGUF header needs neither JAX nor the model.
"""

from models import _lazy

_EXPORTS = {
    **{m: f"models.io.{m}" for m in ("encoders", "gguf", "load", "tokenizer", "weights")},
    **dict.fromkeys(("ByteEncoder", "Encoder", "TokenizerEncoder", "check_text"), "models.io.encoders"),
    **dict.fromkeys(("GGUFError", "GGUFModel", "GGUFTokenizerData", "TensorInfo", "dequantize_q8_0", "permute_qk", "read_gguf",
                     "read_gguf_config", "read_gguf_metadata", "read_gguf_tokenizer_data", "smollm2_gguf_path",
                     "unpermute_qk", "write_llama_gguf"), "models.io.gguf"),
    **dict.fromkeys(("DEFAULT_MODEL", "KNOWN_SHA256", "Model", "file_sha256", "gguf_encoder", "gguf_header", "is_gguf",
                     "load_model", "model_encoder", "model_name"), "models.io.load"),
    **dict.fromkeys(("BYTE_TO_UNICODE", "END_OF_TEXT", "IM_END", "IM_START", "Tokenizer", "build_tokenizer",
                     "chatml_default_system_prompt"), "models.io.tokenizer"),
    **dict.fromkeys(("load_gguf", "named_config", "params_from_gguf"), "models.io.weights"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy(__name__, _EXPORTS)
