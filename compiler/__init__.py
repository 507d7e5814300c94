"""tunec's compiler: recipe -> validated recipe -> tokenized, packed shards + run plan.

This package never imports torch: a data-preparation machine may have none, and
the CLI must start fast. The runtime (``runtime/``) imports this package, never
the reverse.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tunec")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

# Bumped whenever the shard layout or the plan schema changes incompatibly; the
# runtime refuses a plan whose format version it does not know.
FORMAT_VERSION = 1
