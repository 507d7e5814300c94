"""Installed versions of distributions (tunec's own, the libraries a build depends on), read cheaply.

``importlib.metadata`` costs tens of milliseconds to import and scan; a
compile that reuses everything it built before spends little more than that.
An installed distribution has a ``NAME-VERSION.dist-info`` folder on
``sys.path``; its name says the version. Anything else (an egg, a zip) is
asked of ``importlib.metadata``.

>>> dist_version("a-package-that-is-not-installed")
'absent'
"""

from __future__ import annotations

import functools
import os
import re
import sys


@functools.lru_cache(maxsize=None)
def _listing(folder: str) -> tuple[str, ...]:
    try:
        return tuple(os.listdir(folder))
    except OSError:
        return ()


@functools.lru_cache(maxsize=None)
def dist_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``absent``."""
    norm = re.sub(r"[-_.]+", "_", name).lower()
    for folder in sys.path:
        for entry in _listing(folder or "."):
            if entry.endswith(".dist-info") and "-" in entry:
                dist, version = entry[: -len(".dist-info")].split("-", 1)
                if re.sub(r"[-_.]+", "_", dist).lower() == norm:
                    return version
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
