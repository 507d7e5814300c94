"""Installed versions of the libraries whose output a build depends on (see :mod:`tunec._dist`)."""

from tunec._dist import dist_version

__all__ = ["dist_version"]
