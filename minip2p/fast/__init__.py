"""The fast path: kernels picked by measurement on this machine (kernels.py, autotune.py). The
reference model never needs it; tests prove it gives the explicit path's outputs."""
