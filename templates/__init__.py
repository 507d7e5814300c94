"""The template library, shipped as package data: ``FAMILY/NAME.j2`` files (see README.md)."""
