"""Training data made by the methods: InstructPix2Pix's Prompt-to-Prompt pairs (pairs.py) and the
CLIP image judge that filters them (clip_image.py)."""
