"""tunec's compiler: recipe -> validated recipe -> tokenized, packed shards + run plan.

This package never imports torch: a data-preparation machine may have none, and
the CLI must start fast. The runtime (``tunec.runtime``) imports this package,
never the reverse.
"""

from tunec import __version__  # noqa: F401  (re-exported: written into every plan)

# Bumped whenever the shard layout or the plan schema changes incompatibly; the
# runtime refuses a plan whose format version it does not know.
FORMAT_VERSION = 1
