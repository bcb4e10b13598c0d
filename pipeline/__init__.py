"""stickerbot's model side and job queue.

Importing this package (or its settings, storage and queue modules) loads no model library:
the bot process imports those, and it must stay free of torch.
"""

__version__ = "0.1.0"
