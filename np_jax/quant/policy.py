"""The precision policy: which tensor gets which integer width.

The policy is data: an ordered list of (pattern, TensorQuant) rules; the first pattern
(fnmatch) that matches a tensor's role decides its width. Roles are strings such as
`layers.3.attn.q.w` (a weight), `layers.3.attn.x` (the input shared by the q, k and v
projections; `attn.o.x`, `mlp.x` (gate and up), `mlp.down.x` likewise),
`layers.3.attn.kv` (the KV cache), `layers.3.attn.qk.q` (the query entering Q K^T),
`layers.3.attn.probs` (attention probabilities entering P V), `layers.3.mlp.silu` (SiLU input
and output), `lm_head.w`, `lm_head.x`. Each layer may have its own widths (as each card of the
appliance may): `PrecisionPolicy.at(i)` is layer i's view, `layer_groups` the runs of layers
that share every width (the model scans each run as one compiled layer).

A policy is a named preset (`POLICIES`) or a JSON file with the same rules (`load_policy`), e.g.

    {"name": "w4a4-l0l29w8", "base": "w4a4",
     "rules": [["layers.0.*", "w8a8"], ["layers.29.mlp.*", "w8a8"]]}

whose rules come before the base's: a rule's width is a preset's name (the role gets that
preset's width) or {"bits": 8, "signed": true, "per_channel": false, "dynamic": false}.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from np_jax.quant.lsq import FLOAT, TensorQuant


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which tensors get which width: ordered (fnmatch pattern, width) rules, first match wins; a
    rule's width is a `TensorQuant` or another policy (the role gets that policy's width)."""

    name: str
    rules: tuple[tuple[str, "TensorQuant | PrecisionPolicy"], ...]
    description: str = ""
    layer_index: int = 0  # the layer `layer` speaks of (`at`)

    def __call__(self, role: str) -> TensorQuant:
        memo = self._memo()
        try:
            return memo[role]
        except KeyError:
            pass
        for pattern, tq in self.rules:
            if fnmatch.fnmatchcase(role, pattern):
                memo[role] = tq = tq(role) if isinstance(tq, PrecisionPolicy) else tq
                return tq
        raise KeyError(f"precision policy {self.name!r} has no rule for tensor {role!r}")

    def _memo(self) -> dict:
        """Each role's width, once matched (the planner asks for the same roles many thousand times),
        and the layer ranges whose VMM operands passed `check_vmm_operands`; shared by the layer views
        of `at`, which have the same rules. Not a field: equality, hashing and `replace` ignore it."""
        memo = self.__dict__.get("_memo_roles")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_memo_roles", memo)
        return memo

    @property
    def is_float(self) -> bool:
        return all(tq.is_float for _, tq in self.rules)

    def at(self, i: int) -> "PrecisionPolicy":
        """Layer i's view: `layer(role)` is layer i's width."""
        if i == self.layer_index:
            return self
        view = dataclasses.replace(self, layer_index=i)
        object.__setattr__(view, "_memo_roles", self._memo())
        return view

    def layer(self, role: str) -> TensorQuant:
        """The width of `role` in this view's layer (`at`; layer 0 by default), e.g. "attn.q.w"."""
        return self(f"layers.{self.layer_index}.{role}")

    def output(self, role: str) -> TensorQuant:
        """The width of the output layer's "w" (weights) or "x" (input)."""
        return self(f"lm_head.{role}")

    def widths(self, i: int, roles) -> tuple[TensorQuant, ...]:
        """Layer i's widths of `roles`."""
        return tuple(self(f"layers.{i}.{r}") for r in roles)

    def layer_groups(self, n_layers: int, roles) -> tuple[tuple[int, ...], ...]:
        """The layers grouped by their widths over `roles` (each group's layers in order; groups in
        the order of their first layer). One group: the policy is uniform over the layers."""
        groups: dict[tuple, list[int]] = {}
        for i in range(n_layers):
            groups.setdefault(self.widths(i, roles), []).append(i)
        return tuple(tuple(g) for g in groups.values())

    def check(self, n_layers: int, roles) -> None:
        """Raise (ValueError, naming the layer and role) unless every layer's roles resolve and
        each role keeps, across layers, whether it is float and whether it is dynamic: what a layer
        holds (its step sizes, its KV cache's type) must not change from layer to layer."""
        try:
            self.check_vmm_operands(n_layers)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        for r in roles:
            try:
                first = self(f"layers.0.{r}")
            except KeyError as e:
                raise ValueError(str(e.args[0])) from None
            for i in range(1, n_layers):
                try:
                    tq = self(f"layers.{i}.{r}")
                except KeyError as e:
                    raise ValueError(str(e.args[0])) from None
                if (tq.is_float, tq.dynamic) != (first.is_float, first.dynamic):
                    raise ValueError(f"policy {self.name!r} makes layer {i}'s {r} "
                                     f"{'float' if tq.is_float else 'dynamic' if tq.dynamic else 'static'} and "
                                     f"layer 0's {'float' if first.is_float else 'dynamic' if first.dynamic else 'static'}"
                                     "; layers may differ in widths, not in what they hold")
        for r in ("w", "x"):
            try:
                self.output(r)
            except KeyError as e:
                raise ValueError(str(e.args[0])) from None

    # the operands of every layer matrix's VMM and of the attention products' (the output layer's: "lm_head.w/x")
    VMM_ROLES = tuple(f"{m}.w" for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")) \
        + ("attn.x", "attn.o.x", "mlp.x", "mlp.down.x", "attn.qk.q", "attn.kv", "attn.probs")

    def check_vmm_operands(self, n_layers: int, first: int = 0) -> None:
        """Raise (ValueError, naming the layer and role) if a policy that quantizes anything leaves
        an operand of a layer matrix's product, of QK^T or P V, or of the output layer's float:
        those products run on the core array's VMM, whose operands are INT8/INT4/INT2 (the float
        preset runs none of them; SiLU, on the activation unit, may stay float). Layers `first` to
        `n_layers - 1`."""
        memo, checked = self._memo(), ("vmm operands checked", n_layers, first)
        if self.is_float or checked in memo:
            return
        for i in range(first, n_layers):
            for r in self.VMM_ROLES:
                if self(f"layers.{i}.{r}").is_float:
                    raise ValueError(f"policy {self.name!r} makes layer {i}'s {r} float; its product runs on the "
                                     "VMM, whose operands are INT8, INT4 or INT2: give it a width")
        for r in ("w", "x"):
            if self.output(r).is_float:
                raise ValueError(f"policy {self.name!r} makes lm_head.{r} float; the output layer runs on the VMM, "
                                 "whose operands are INT8, INT4 or INT2: give it a width")
        memo[checked] = True

    def key(self) -> str:
        """What identifies the policy's widths (a preset: its name; a file: its name and rules' hash)."""
        if POLICIES.get(self.name) == self.at(0):
            return self.name
        return f"{self.name}-{hashlib.sha256(_canonical(self).encode()).hexdigest()[:16]}"


def _canonical(p: "PrecisionPolicy") -> str:
    def spec(tq):
        return {"policy": _canonical(tq)} if isinstance(tq, PrecisionPolicy) else dataclasses.asdict(tq)
    return json.dumps([[pat, spec(tq)] for pat, tq in p.rules], sort_keys=True)


def _w(bits):  # weights: per-output-channel steps
    return TensorQuant(bits, per_channel=True)


# Roles every integer policy shares: the online rotations' ±1 matrices are exact INT2 weights and
# their inputs are INT8 (models.recipe).
TRANSFORM_RULES = (("*.rot.w", _w(2)), ("*.rot.x", TensorQuant(8, dynamic=True)))


POLICIES: dict[str, PrecisionPolicy] = {
    p.name: p
    for p in [
        PrecisionPolicy(
            "w4a4",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(4, signed=False)), ("*.w", _w(4)), ("*", TensorQuant(4))),
            "HPEC24: INT4 weights, linear/matmul inputs and KV cache; INT8 output layer and SiLU",
        ),
        PrecisionPolicy(
            "a8c8w4",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("*.attn.probs", TensorQuant(8)), ("*.w", _w(4)),
                               ("*", TensorQuant(8))),
            "rack successor: 8-bit activations and KV cache, 4-bit weights (INT8 output layer)",
        ),
        PrecisionPolicy(
            "w8a8",
            TRANSFORM_RULES + (("*.attn.probs", TensorQuant(8)), ("*.w", _w(8)), ("*", TensorQuant(8))),
            "INT8 weights, activations and KV cache",
        ),
        # Variants the measurements justify (docs/quantization.md): each differs from its base in a
        # few roles, and every results table names the policy it used.
        PrecisionPolicy(
            "w4a4-p8",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(8)), ("*.w", _w(4)), ("*", TensorQuant(4))),
            "w4a4 with 8-bit attention probabilities (codes 0..127)",
        ),
        PrecisionPolicy(
            "w4a4-p8d8",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(8)), ("*.mlp.down.x", TensorQuant(8)), ("*.w", _w(4)),
                               ("*", TensorQuant(4))),
            "w4a4 with 8-bit attention probabilities and an 8-bit down-projection input",
        ),
        PrecisionPolicy(
            "a8c8w4-dyn",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("*.attn.probs", TensorQuant(8)), ("*.attn.kv", TensorQuant(8)),
                               ("*.mlp.silu", TensorQuant(8)), ("*.attn.qk.q", TensorQuant(8)), ("*.w", _w(4)),
                               ("*", TensorQuant(8, dynamic=True))),
            "a8c8w4 with dynamic per-token steps (vector-unit max-reduce) for the linear layers' inputs",
        ),
        PrecisionPolicy(
            "w8a8-dyn",
            TRANSFORM_RULES + (("*.attn.probs", TensorQuant(8)), ("*.attn.kv", TensorQuant(8)),
                               ("*.mlp.silu", TensorQuant(8)), ("*.attn.qk.q", TensorQuant(8)), ("*.w", _w(8)),
                               ("*", TensorQuant(8, dynamic=True))),
            "w8a8 with dynamic per-token steps (vector-unit max-reduce) for the linear layers' inputs",
        ),
        # Dynamic probability steps: each row of attention probabilities quantized at its own step (its
        # max / Q_P: one max-reduce per row in the vector unit), not one static step for every row;
        # a diffuse row's small probabilities otherwise round to zero (docs/quantization.md).
        PrecisionPolicy(
            "w4a4-pd",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(4, signed=False, dynamic=True)), ("*.w", _w(4)),
                               ("*", TensorQuant(4))),
            "w4a4 with a dynamic step per row of attention probabilities",
        ),
        PrecisionPolicy(
            "a8c8w4-pd",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("*.attn.probs", TensorQuant(8, dynamic=True)), ("*.w", _w(4)),
                               ("*", TensorQuant(8))),
            "a8c8w4 with a dynamic step per row of attention probabilities",
        ),
        PrecisionPolicy(
            "w8a8-pd",
            TRANSFORM_RULES + (("*.attn.probs", TensorQuant(8, dynamic=True)), ("*.w", _w(8)), ("*", TensorQuant(8))),
            "w8a8 with a dynamic step per row of attention probabilities",
        ),
        # ... and a dynamic step per token of the down projection's input (one max-reduce over d_ff per
        # token): its token-wise outliers set one static step for every token (docs/quantization.md).
        PrecisionPolicy(
            "w4a4-pdd",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(4, signed=False, dynamic=True)),
                               ("*.mlp.down.x", TensorQuant(4, dynamic=True)), ("*.w", _w(4)), ("*", TensorQuant(4))),
            "w4a4-pd with a dynamic step per token of the down projection's input",
        ),
        PrecisionPolicy(
            "a8c8w4-pdd",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("*.attn.probs", TensorQuant(8, dynamic=True)),
                               ("*.mlp.down.x", TensorQuant(8, dynamic=True)), ("*.w", _w(4)), ("*", TensorQuant(8))),
            "a8c8w4-pd with a dynamic step per token of the down projection's input",
        ),
        PrecisionPolicy(
            "w8a8-pdd",
            TRANSFORM_RULES + (("*.attn.probs", TensorQuant(8, dynamic=True)), ("*.mlp.down.x", TensorQuant(8, dynamic=True)),
                               ("*.w", _w(8)), ("*", TensorQuant(8))),
            "w8a8-pd with a dynamic step per token of the down projection's input",
        ),
        PrecisionPolicy("float", (("*", FLOAT),), "no quantization (float32 reference)"),
    ]
}


def wants_qk_rotation(policy, n_layers: int = 1) -> bool:
    """Whether the recipes add the online Hadamard on q and k at `policy`: when any of the
    `n_layers` layers keeps a quantized KV cache (the rotation is the model's, every layer's).
    Measured on SmolLM2 it pays at every cache width: w4a4 gains most, and with the sink's own steps
    w8a8-pdd goes from 1.039x to 1.024x float perplexity for 6 % of the appliance's throughput
    (docs/quantization.md; an earlier rule, from before the sink's steps, kept it off at 8 bits).
    The one rule the recipes and `np-jax map` share."""
    p = get_policy(policy)
    return any(not p.at(i).layer("attn.kv").is_float for i in range(n_layers))


def get_policy(name: str | PrecisionPolicy) -> PrecisionPolicy:
    """A preset by name, or the policy of a JSON file (a path ending in .json; `load_policy`)."""
    if isinstance(name, PrecisionPolicy):
        return name
    if isinstance(name, (str, Path)) and str(name).endswith(".json"):
        return load_policy(name)
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(POLICIES)} "
                         "or a policy file (.json)") from None


_TQ_FIELDS = {f.name for f in dataclasses.fields(TensorQuant)}


def _rule_target(v, where: str):
    if isinstance(v, str):
        if v not in POLICIES:
            raise ValueError(f"{where}: unknown preset {v!r}; choose one of {', '.join(POLICIES)}")
        return POLICIES[v]
    if isinstance(v, dict) and set(v) <= _TQ_FIELDS and "bits" in v:
        bits = v["bits"]
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits not in (2, 4, 8)):
            raise ValueError(f"{where}: bits must be 2, 4, 8 or null (float), got {bits!r}")
        if not all(isinstance(v.get(k, False), bool) for k in _TQ_FIELDS - {"bits"}):
            raise ValueError(f"{where}: signed, per_channel and dynamic must be true or false")
        return TensorQuant(**v)
    raise ValueError(f"{where}: a width is a preset's name or an object with \"bits\" (and optionally "
                     f"\"signed\", \"per_channel\", \"dynamic\"), got {v!r}")


def load_policy(path: str | Path) -> PrecisionPolicy:
    """The policy of a JSON file (module docstring): {"name", "description", "base", "rules"}.
    Rules are (fnmatch pattern, width) pairs, first match wins, before the base preset's rules;
    without a base, the file's rules must cover every role. Raises ValueError naming the file and
    the fault."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"policy file {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not set(data) <= {"name", "description", "base", "rules"}:
        raise ValueError(f"policy file {path}: expected an object with name, description, base and rules")
    rules = data.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                                              for r in rules):
        raise ValueError(f"policy file {path}: rules must be a list of [pattern, width] pairs")
    out = tuple((pat, _rule_target(v, f"policy file {path}, rule {pat!r}")) for pat, v in rules)
    base = data.get("base")
    if base is not None:
        out += _rule_target(base, f"policy file {path}, base").rules
    elif not out:
        raise ValueError(f"policy file {path}: no rules and no base")
    # the online rotations' widths are the chip's (exact ±1 INT2 weights, INT8 inputs): every policy's
    out = TRANSFORM_RULES + out if not all(tq.is_float for _, tq in out if isinstance(tq, TensorQuant)) else out
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy file {path}: name must be a non-empty string")
    return PrecisionPolicy(name, out, str(data.get("description", f"from {path}")))
