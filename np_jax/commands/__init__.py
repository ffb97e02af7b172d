"""np_jax's own `np-jax` subcommands: `spec`, `map`, `perf`, `dse`, `plan` (registered through the
`np_jax.commands` entry points, like the commands other packages add)."""
