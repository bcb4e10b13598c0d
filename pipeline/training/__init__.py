"""Learning a style: sticker-set preparation, the rare identifier, cached class-prior images,
the DreamBooth-LoRA trainer and the style directory it writes."""
