"""One module per ``stickerbot`` sub-command (see :mod:`pipeline.cli`)."""
