"""The editing methods, one file each, side by side: Prompt-to-Prompt (p2p.py with its token
alignment align.py), MasaCtrl (masactrl.py), plug-and-play (pnp.py), SDEdit (sdedit.py). Each
is a controller on the control surface of minip2p.control, or a way to start the sampling loop."""
