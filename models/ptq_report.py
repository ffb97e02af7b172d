"""Float vs post-training-quantized agreement on SmolLM2-135M (no QAT).

Run: `python -m models.ptq_report [--files N] [--tokens T] [--json OUT]`. For each precision
policy and calibration method, reports perplexity and top-1 agreement with the float model on
held-out Python files from the standard library (calibration uses a different file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CALIBRATION_FILE = "json/decoder.py"
HELD_OUT = ["textwrap.py", "fnmatch.py", "shlex.py", "bisect.py", "heapq.py", "glob.py"]


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import llama, loaders
    from models.gguf_loader import smollm2_gguf_path
    from models.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4, help="held-out standard-library files")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per file")
    ap.add_argument("--json", default=None, help="write the report to this file")
    a = ap.parse_args(argv)

    lib = Path(json.__file__).parent.parent
    cfg, params = loaders.load_gguf()
    tok = Tokenizer.from_gguf(smollm2_gguf_path())
    cal = jnp.asarray([tok.encode((lib / CALIBRATION_FILE).read_text())[: a.tokens]])
    files = HELD_OUT[: a.files]
    ev = jnp.asarray([tok.encode((lib / f).read_text())[: a.tokens] for f in files])
    fwd = jax.jit(lambda p, t, pol: llama.forward(p, t, cfg, pol), static_argnums=2)

    def nll(logits):
        lp = jax.nn.log_softmax(logits[:, :-1])
        return float(-jnp.take_along_axis(lp, ev[:, 1:, None], -1).mean())

    t0 = time.time()
    ref = fwd(params, ev, "float")
    rows = [{"precision": "float", "calibration": None, "perplexity": float(np.exp(nll(ref))), "top1_agreement": 1.0}]
    for pol in ("w8a8", "a8c8w4", "w4a4"):
        for method in ("mse", "lsq"):
            q = llama.calibrate(params, cal, cfg, pol, method)
            lg = fwd(q, ev, pol)
            rows.append({"precision": pol, "calibration": method, "perplexity": float(np.exp(nll(lg))),
                         "top1_agreement": float((lg.argmax(-1) == ref.argmax(-1)).mean())})
            print(rows[-1], file=sys.stderr)
    report = {"model": cfg.name, "held_out_files": files, "tokens_per_file": a.tokens,
              "calibration_file": CALIBRATION_FILE, "rows": rows, "minutes": (time.time() - t0) / 60,
              "command": "python -m models.ptq_report " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = json.dumps(report, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
