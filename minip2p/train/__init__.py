"""Learning through a frozen diffusion model: the shared trainer loop (loop.py), textual
inversion (textual_inversion.py: a new word from pictures) and Visii (visii.py: an instruction
from one before/after pair)."""
