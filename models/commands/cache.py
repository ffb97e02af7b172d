"""`np-jax cache`: list the prepared-model cache (models.prepared) and free it.

`np-jax cache [--json]` lists every entry (key, model, precision, recipe, size, date made, date
last used) with the total, the size bound ($NP_JAX_CACHE_MAX) and the folder; `np-jax cache
clear KEY...` removes entries (a key or an unambiguous prefix of one, as listed), `np-jax cache
clear --all` all of them. Registered through the
`np_jax.commands` entry point.
"""

from __future__ import annotations

import json
import time

from np_jax.cli import Formatter


def register(sub) -> None:
    p = sub.add_parser(
        "cache", help="list or free the prepared-model cache",
        description="List the prepared-model cache: each quantized model a recipe made once (about 54 MB for "
                    "SmolLM2 at 4-bit weights, 107 MB at w8a8), kept under $NP_JAX_CACHE/prepared (default "
                    "~/.cache/np_jax/prepared) and reused by np-jax run, eval and train. The cache is bounded: "
                    "after a new entry is written, the least recently used ones are removed until the entries fit in "
                    "$NP_JAX_CACHE_MAX (a size such as 5GB, 800MB or 2GiB, or none; default 5GB). "
                    "`np-jax cache clear` frees it.",
        formatter_class=Formatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=list_command)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    c = actions.add_parser("clear", help="remove cache entries",
                           description="Remove prepared-model cache entries: the keys given (or unambiguous prefixes, "
                                       "as `np-jax cache` lists them), or every entry with --all.",
                           formatter_class=Formatter)
    c.add_argument("keys", nargs="*", metavar="KEY", help="entries to remove")
    c.add_argument("--all", action="store_true", help="remove every entry")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=clear_command)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "-"


def list_command(args) -> int:
    from models.prepared import LIMIT_ENV, cache_limit, cache_root, entries

    root, items, limit = cache_root(), entries(), cache_limit()
    total = sum(e.bytes for e in items)
    bound = f"bound {_mb(limit)}" if limit is not None else "no bound"
    if args.json:
        print(json.dumps({"location": str(root), "entries": [e.to_json() for e in items], "total_bytes": total,
                          "limit_bytes": limit}, indent=2))
        return 0
    print(f"prepared-model cache: {root} ({bound}, {LIMIT_ENV})")
    if not items:
        print("no entries")
        return 0
    rows = [("KEY", "MODEL", "PRECISION", "RECIPE", "SIZE", "CREATED", "USED", "")]
    rows += [(e.key[:12], e.model or "-", e.precision or "-", e.recipe or "-", _mb(e.bytes),
              (e.created or "-")[:16].replace("T", " "), _when(e.used), "" if e.status == "current" else e.status)
             for e in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"{len(items)} entr{'y' if len(items) == 1 else 'ies'}, {_mb(total)} (free with: np-jax cache clear KEY... "
          "or --all; the least recently used go first when a new entry passes the bound)")
    return 0


def clear_command(args) -> int:
    from models.prepared import cache_root, entries, remove

    if args.all == bool(args.keys):
        raise ValueError("give the keys of the entries to remove, or --all")
    items = entries()
    chosen = items if args.all else []
    for k in args.keys:  # every key resolved before anything is removed
        found = [e for e in items if e.key.startswith(k)] if k else []
        if len(found) != 1:
            raise ValueError(f"{'no' if not found else 'more than one'} prepared-model cache entry matches {k!r} "
                             "(see np-jax cache)")
        chosen += [e for e in found if e not in chosen]
    freed = remove(chosen)
    if args.json:
        print(json.dumps({"location": str(cache_root()), "removed": [e.key for e in chosen], "freed_bytes": freed}))
    else:
        print(f"removed {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'} ({_mb(freed)}) from {cache_root()}")
    return 0
