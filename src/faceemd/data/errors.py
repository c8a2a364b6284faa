"""The error types of the data package: what a face set or an alignment raises for one image,
so that a caller can skip that image (``on_bad_image='skip'``) or name it in its message."""

from __future__ import annotations

__all__ = ["BadImageError", "NoFaceError"]


class BadImageError(ValueError):
    """An image file is missing or cannot be decoded."""


class NoFaceError(ValueError):
    """No usable face (box or landmarks) in an image that needs one."""
