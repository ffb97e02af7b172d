"""Model I/O: the defensive GGUF reader/writer (`gguf`), GGUF tensors into the parameter tree
(`weights`), the byte-level BPE tokenizer rebuilt from GGUF metadata (`tokenizer`), encoders
for the data pipeline and the generator (`encoders`), and `load_model` (`load`)."""
