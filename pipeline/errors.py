"""The exceptions stickerbot raises on purpose.

    StickerbotError                 base; ``str(err)`` is a message a user or operator can act on
    ├── ConfigError                 a setting is missing or malformed (names the variable)
    ├── ModelNotFoundError          a model id/path cannot be loaded offline (says how to fix)
    ├── UntrainedSegmenterError     the segmenter has no trained foreground head (says how to fix)
    ├── InputError                  bad input from a user; nothing else was touched
    │   ├── ImageError              one image cannot be used (names the file)
    │   │   ├── NotAnImageError     not an image at all, or corrupt
    │   │   ├── ImageTooLargeError  over the pixel limit (decompression bombs)
    │   │   ├── ImageTooSmallError  under the minimum side
    │   │   └── UnsupportedStickerError  animated (TGS) or video (WEBM) sticker
    │   └── StickerSetError         a set as a whole is unusable (too few usable images)
    ├── StyleError                  a style directory is missing, damaged or incompatible
    ├── JobError                    queue misuse: unknown job, lost lease, quota exceeded
    │   ├── QuotaExceededError      a per-user cap was reached
    │   └── QueueUnavailableError   the queue backend cannot be reached right now
    ├── CancelledError              a job was cancelled by its owner (stops training)
    └── TrainingPreempted           training paused at a step boundary (checkpoint written) so
                                    that sticker jobs can run; the same work dir resumes it

Each error carries only what is safe to show: never a token, never a raw API path.
"""

from __future__ import annotations


class StickerbotError(Exception):
    """Base of every error stickerbot raises on purpose."""


class ConfigError(StickerbotError):
    """A setting is missing or malformed."""


class ModelNotFoundError(StickerbotError):
    """A model cannot be loaded from the given id or directory."""


class UntrainedSegmenterError(StickerbotError):
    """The background remover has no trained foreground head: stickers would be opaque rectangles."""


class InputError(StickerbotError):
    """Bad input from a user."""


class ImageError(InputError):
    """One image cannot be used. ``name`` is the file's display name."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")


class NotAnImageError(ImageError):
    """Not an image, or a corrupt one."""


class ImageTooLargeError(ImageError):
    """More pixels than the limit allows."""


class ImageTooSmallError(ImageError):
    """A side is below the minimum."""


class UnsupportedStickerError(ImageError):
    """An animated (TGS) or video (WEBM) sticker with no decodable frame."""


class StickerSetError(InputError):
    """A sticker set cannot be used for training as a whole."""


class StyleError(StickerbotError):
    """A style directory is missing, damaged or made for another base model."""


class JobError(StickerbotError):
    """Misuse of the job queue."""


class QuotaExceededError(JobError):
    """A per-user cap was reached."""


class QueueUnavailableError(JobError):
    """The queue backend (e.g. Redis) cannot be reached right now."""


class CancelledError(StickerbotError):
    """The job was cancelled by its owner."""


class TrainingPreempted(StickerbotError):
    """Training stopped at a step boundary and wrote a checkpoint; calling ``train_style`` again
    with the same work dir resumes it. ``step`` is the step the checkpoint holds."""

    def __init__(self, step: int, total: int) -> None:
        self.step = step
        self.total = total
        super().__init__(f"training paused at step {step} of {total}; it resumes from its checkpoint")
