"""Accelerator memory helpers shared by the worker loop and the Celery task side.

They sit below both (neither imports the other for them) and import torch only when it is
already loaded or asked for, so the bot, which imports the Celery side to send tasks, never does.
"""

from __future__ import annotations

import contextlib
import gc
import sys


def is_out_of_memory(exc: BaseException) -> bool:
    # Without torch imported nothing could have raised its error (and a no-op worker should not
    # pay seconds for the import).
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def free_accelerator_memory() -> None:
    gc.collect()
    with contextlib.suppress(ImportError):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
