"""The guidance batch: which image and which condition each row of a UNet call holds, and the one
place where classifier-free guidance is computed.

Classifier-free guidance (Ho & Salimans 2022), for an image with condition c and scale g:

    ε̃ = ε_θ(z_t, t, ∅) + g · (ε_θ(z_t, t, c) − ε_θ(z_t, t, ∅))                      (`cfg`)

All images of an edit are denoised in one UNet call. Its rows are described by a
`GuidanceBatch`: a tuple of (image, condition) pairs. The usual layout for B images (image 0 is
the source, 1 … B−1 the edits) is the one of diffusers and the P2P code,

    rows = [(0, ∅), (1, ∅), …, (B−1, ∅),  (0, c), (1, c), …, (B−1, c)]             (`cfg_layout`)

Controllers never slice by hand: they ask the batch which rows are the source (`row(0, "text")`),
the edits, or one condition (`rows(cond="uncond")`). Another layout -- an image with no
unconditional row (guidance 1), or InstructPix2Pix's three conditions -- is another tuple, not
another rewrite of the controllers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

UNCOND, TEXT = "uncond", "text"


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε_∅ + g · (ε_c − ε_∅): the classifier-free guidance equation, used everywhere."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@dataclass(frozen=True)
class GuidanceBatch:
    """rows[r] = (image, condition) of row r of the UNet batch."""
    rows: tuple[tuple[int, str], ...]

    @classmethod
    def cfg_layout(cls, images: int) -> "GuidanceBatch":
        """[∅ × B, c × B]: every image guided, the unconditional half first."""
        return cls(tuple((b, UNCOND) for b in range(images)) +
                   tuple((b, TEXT) for b in range(images)))

    @property
    def images(self) -> int:
        """B: how many images (latent rows) the batch denoises."""
        return 1 + max(b for b, _ in self.rows)

    @property
    def size(self) -> int:
        return len(self.rows)

    def row(self, image: int, cond: str = TEXT) -> int:
        """The row holding `image` under condition `cond`."""
        return self.rows.index((image, cond))

    def has(self, image: int, cond: str) -> bool:
        return (image, cond) in self.rows

    def rows_of(self, image: int | None = None, cond: str | None = None) -> list[int]:
        """Rows of one image and/or one condition, in batch order."""
        return [r for r, (b, c) in enumerate(self.rows)
                if (image is None or b == image) and (cond is None or c == cond)]

    def source_row(self, r: int) -> int:
        """The row of the source image (image 0) under the same condition as row r."""
        return self.row(0, self.rows[r][1])

    def image_of_rows(self) -> list[int]:
        return [b for b, _ in self.rows]

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, h, w), one per image -> the UNet input (rows, c, h, w)."""
        return z[self.image_of_rows()]

    def context(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """{condition: (B or 1, 77, d)} -> the UNet's context (rows, 77, d)."""
        return torch.cat([embeddings[c][b if embeddings[c].shape[0] > 1 else 0][None]
                          for b, c in self.rows])

    def guide(self, eps: torch.Tensor, scale: float) -> torch.Tensor:
        """The UNet output (rows, c, h, w) -> one guided ε̃ per image (B, c, h, w): `cfg` where
        the image has an unconditional row, its conditional ε alone where it has none."""
        cond = self.rows_of(cond=TEXT)
        if len(cond) != self.images:
            raise ValueError(f"every image needs one {TEXT!r} row: {self.rows}")
        if all(self.has(b, UNCOND) for b in range(self.images)):
            if self.rows == GuidanceBatch.cfg_layout(self.images).rows:
                eps_u, eps_c = eps.chunk(2)                                # [∅ × B, c × B]
            else:
                eps_u = eps[[self.row(b, UNCOND) for b in range(self.images)]]
                eps_c = eps[[self.row(b, TEXT) for b in range(self.images)]]
            return cfg(eps_u, eps_c, scale)
        return torch.stack([cfg(eps[self.row(b, UNCOND)], eps[self.row(b, TEXT)], scale)
                            if self.has(b, UNCOND) else eps[self.row(b, TEXT)]
                            for b in range(self.images)])
