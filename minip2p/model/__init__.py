"""The networks of Stable Diffusion, built from their config.json: the UNet ε_θ (unet.py), the
VAE (vae.py), CLIP's text encoder (clip.py) and its tokenizer (tokenizer.py), and the configs
(config.py). Module names equal the checkpoint keys, so loading is by name."""
