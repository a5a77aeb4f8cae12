"""The guidance batch: which image and which condition each row of a UNet call holds, and the one
place where classifier-free guidance is computed.

Classifier-free guidance (Ho & Salimans 2022), for an image with condition c and scale g:

    ε̃ = ε_θ(z_t, t, ∅) + g · (ε_θ(z_t, t, c) − ε_θ(z_t, t, ∅))                      (`cfg`)

InstructPix2Pix (Brooks et al. 2023) conditions on an instruction T and an input image I (its
VAE latents concatenated to z_t) and guides each separately, with scales s_T and s_I:

    ε̃ = ε(∅,∅) + s_I · (ε(∅,I) − ε(∅,∅)) + s_T · (ε(T,I) − ε(∅,I))                 (`cfg_image`)

All images of an edit are denoised in one UNet call. Its rows are described by a
`GuidanceBatch`: a tuple of (image, condition) pairs. The usual layout for B images (image 0 is
the source, 1 … B−1 the edits) is the one of diffusers and the P2P code,

    rows = [(0, ∅), (1, ∅), …, (B−1, ∅),  (0, c), (1, c), …, (B−1, c)]             (`cfg_layout`)

Controllers never slice by hand: they ask the batch which rows are the source (`row(0, "text")`),
the edits, or one condition (`rows(cond="uncond")`). Another layout -- an image with no
unconditional row (guidance 1), or InstructPix2Pix's three conditions -- is another tuple, not
another rewrite of the controllers.

Conditions: "uncond" (∅), "text" (the prompt c), and for InstructPix2Pix "image" (∅ text, the
image I). In a batch that has "image" rows, "text" rows hold (T, I) and "uncond" rows (∅, ∅):
`instruct_layout`, [(T,I) × B, (∅,I) × B, (∅,∅) × B] as diffusers' pipeline orders them;
`image_cond` gives each row its image latents (zeros where the image is dropped).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

UNCOND, TEXT, IMAGE = "uncond", "text", "image"


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε_∅ + g · (ε_c − ε_∅): the classifier-free guidance equation, used everywhere."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def cfg_image(eps_uncond: torch.Tensor, eps_image: torch.Tensor, eps_cond: torch.Tensor,
              scale: float, image_scale: float) -> torch.Tensor:
    """ε̃ = ε_∅ + s_I · (ε_I − ε_∅) + s_T · (ε_TI − ε_I): InstructPix2Pix's two-way guidance."""
    return eps_uncond + image_scale * (eps_image - eps_uncond) + scale * (eps_cond - eps_image)


@dataclass(frozen=True)
class GuidanceBatch:
    """rows[r] = (image, condition) of row r of the UNet batch."""
    rows: tuple[tuple[int, str], ...]

    @classmethod
    def cfg_layout(cls, images: int) -> "GuidanceBatch":
        """[∅ × B, c × B]: every image guided, the unconditional half first."""
        return cls(tuple((b, UNCOND) for b in range(images)) +
                   tuple((b, TEXT) for b in range(images)))

    @classmethod
    def instruct_layout(cls, images: int) -> "GuidanceBatch":
        """[(T,I) × B, (∅,I) × B, (∅,∅) × B]: InstructPix2Pix (diffusers' order)."""
        return cls(tuple((b, c) for c in (TEXT, IMAGE, UNCOND) for b in range(images)))

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

    def image_cond(self, image_latents: torch.Tensor) -> torch.Tensor:
        """InstructPix2Pix: image latents (B or 1, c, h, w) -> one per row (rows, c, h, w): the
        image's latents on "text" and "image" rows, zeros on "uncond" rows."""
        pick = [b if image_latents.shape[0] > 1 else 0 for b, _ in self.rows]
        keep = torch.tensor([c != UNCOND for _, c in self.rows], dtype=image_latents.dtype,
                            device=image_latents.device)
        return image_latents[pick] * keep[:, None, None, None]

    def guide(self, eps: torch.Tensor, scale: float, image_scale: float | None = None):
        """The UNet output (rows, c, h, w) -> one guided ε̃ per image (B, c, h, w): `cfg` where
        the image has an unconditional row, its conditional ε alone where it has none;
        `cfg_image` (scales `scale`, `image_scale`) where it has all three conditions."""
        cond = self.rows_of(cond=TEXT)
        if len(cond) != self.images:
            raise ValueError(f"every image needs one {TEXT!r} row: {self.rows}")
        if self.rows_of(cond=IMAGE):
            if image_scale is None:
                raise ValueError("a batch with image rows needs an image guidance scale")
            pick = [[self.row(b, c) for b in range(self.images)] for c in (UNCOND, IMAGE, TEXT)]
            return cfg_image(eps[pick[0]], eps[pick[1]], eps[pick[2]], scale, image_scale)
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
