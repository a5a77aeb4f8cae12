"""Real pictures: reading and fitting them (images.py), inverting them into the latents and
prompts the editing methods start from -- DDIM, null-text and negative-prompt inversion
(invert.py) -- and ControlNet's hint pictures: Canny edges and the annotator's resize (canny.py)."""
