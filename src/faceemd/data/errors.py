"""The error types of the data package: what a face set or an alignment raises for one image,
so that a caller can skip that image (``on_bad_image='skip'``) or name it in its message."""

from __future__ import annotations

__all__ = ["SKIP_CAUSES", "BadImageError", "ImageTooLargeError", "NoFaceError", "skip_cause"]

# Why an image was left out, as summaries count it: cause -> how the console names it.
SKIP_CAUSES = {
    "no_face": "no face",
    "unreadable": "unreadable",
    "too_large": "over the pixel limit",
}


class BadImageError(ValueError):
    """An image file is missing or cannot be decoded."""


class ImageTooLargeError(BadImageError):
    """An image has more pixels than the data set's ``max_pixels`` (refused before decoding)."""


class NoFaceError(ValueError):
    """No usable face (box or landmarks) in an image that needs one."""


def skip_cause(err: Exception) -> str:
    """Why an image was skipped: a key of :data:`SKIP_CAUSES`."""
    if isinstance(err, ImageTooLargeError):
        return "too_large"
    return "unreadable" if isinstance(err, BadImageError) else "no_face"
