"""Measuring a style: CLIP-I, CLIP-T, DINO and diversity metrics, evaluation, sweeps and
prompt ranking."""
