"""minip2p: a minimal, readable Stable Diffusion 1.x with Prompt-to-Prompt built in."""
from .errors import MinipError

__all__ = ["MinipError"]
