"""Real pictures: reading and fitting them (images.py) and inverting them into the latents and
prompts the editing methods start from -- DDIM, null-text and negative-prompt inversion
(invert.py); the
ControlNet hint pictures: Canny edges and the annotator's resize (canny.py)."""
