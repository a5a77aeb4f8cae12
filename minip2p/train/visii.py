"""Visii (Nguyen et al., NeurIPS 2023): an instruction learned from one before/after pair, through
a frozen InstructPix2Pix model (thaoshibe/visii, `visii.py: train`).

What learns is the text encoder's OUTPUT c_T = ψ(init) (77 × d), rows 1 … eos−1 only (the init
phrase's tokens); the BOS row and the rows from the first EOS on stay as ψ(init) gave them. With
z_0 = E(after) · scaling and I = E(before) (posterior modes), each step takes one timestep t, every
t of 0 … 999 once in a shuffled order, with a noise ε_t drawn once per t before training:

    z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε_t
    ε̂   = ε_∅∅ + s_I (ε_∅I − ε_∅∅) + s_T (ε_TI − ε_∅I)     s_T = 7.5, s_I = 1.5 (guidance.cfg_image)
    L   = 4 · ‖ε̂ − ε_t‖² − 0.1 · clamp(cos(ΔI, W_T · mean_77(c_T)), −1, 0.5)
    ΔI  = normalise(W_I f(after) − W_I f(before))                 (CLIP image features)

— the loss is on the 3-way GUIDED prediction, not on ε_TI. The CLIP term (needs a CLIP whose text
width is the model's, openai/clip-vit-large-patch14 for SD 1.x; data/clip_image.py) pulls the mean
of the rows towards the image change; the clamp stops it above 0.5. AdamW (lr 1e-3, weight decay
1e-2), each gradient value clipped to ±max(ψ(init), ψ("")) (the official bound: the largest value
of the original prompt-embedding batch). The result kept is the step with the lowest MSE (rows
after that step's update, as the official code saves them).

Inference (methods/instruct.py): c_T in place of ψ(instruction); a hybrid instruction writes the
extra words' rows 0 … eos₂−1 over rows eos+2 … eos+2+eos₂−1 of c_T (the official test_concatenate).

Where we differ from the official code, on purpose:
  - no PEZ hard prompt on AFTER (OpenCLIP ViT-H) to start from: the start is a phrase (`init`).
  - plain AdamW, not bitsandbytes' 8-bit AdamW (the same update up to its quantisation); it gets
    the learned rows alone (elementwise, so the same update as the whole tensor with the rest
    restored).
  - z_t by the DDPM forward process directly; the official code reaches the same z_t through
    Euler's add_noise (z_0 + σ_t ε) and scale_model_input (÷ √(σ_t² + 1)).
  - the noises and the order come from a generator seeded by `seed` (so a resumed run redraws them
    identically); more than 1000 steps repeat the timesteps in a new order.
  - without a CLIP model the CLIP term is left out (the toy model has no CLIP of its width).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MinipError, ParameterError
from ..guidance import IMAGE, TEXT, UNCOND, GuidanceBatch
from . import loop

FORMAT = "minip2p-visii"


@dataclass
class Params:
    """The official defaults (configs/config_ip2p.yaml)."""
    init: str = "make it look like this"       # the phrase the learned rows start from
    steps: int = 1000
    lr: float = 1e-3
    guidance: float = 7.5                       # s_T
    image_guidance: float = 1.5                 # s_I
    lambda_mse: float = 4.0
    lambda_clip: float = 0.1
    clip_max: float = 0.5                       # the CLIP term stops above this cosine
    seed: int = 0
    save_every: int = 100

    def check(self) -> None:
        if not self.init.strip():
            raise ParameterError("init", "is empty; give the phrase the instruction starts "
                                         "from, e.g. \"make it blue\"")
        for name in ("guidance", "image_guidance", "lambda_mse", "lambda_clip"):
            if getattr(self, name) < 0:
                raise ParameterError(name, f"must be ≥ 0, got {getattr(self, name)}")


def read_pair(before, after):
    """The two pictures (PIL RGB) of one edit; they must be the same size."""
    from ..real import images
    b, a = images.open_image(before), images.open_image(after)
    if b.size != a.size:
        raise MinipError(f"BEFORE '{before}' is {b.width}×{b.height} pixels but AFTER '{after}' "
                         f"is {a.width}×{a.height}; give the two pictures of one edit, the same "
                         "size")
    return b, a


def clip_direction(clip, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """ΔI = normalise(W_I f(after) − W_I f(before)); pictures (1, 3, H, W) in [0, 1]."""
    f = clip.image_features(clip.preprocess(torch.cat([before, after])))
    d = f[1] - f[0]
    return d / d.norm()


def first_end(model, text: str) -> int:
    """The position of the first end-of-text token among the 77 ids of `text`."""
    from ..model.tokenizer import END
    return int((model.tokenizer([text])[0] == END).nonzero()[0])


class Learner:
    """c_T's rows 1 … eos−1 and the Visii loss at one timestep."""

    def __init__(self, model, p: Params, before: torch.Tensor, after: torch.Tensor, clip=None):
        """before, after: x (1, 3, H, W) in [−1, 1]; `clip`: data.clip_image.CLIPModel or None."""
        from ..methods import instruct
        from ..pipeline import encode_text
        from ..real.images import encode
        instruct.check_model(model)
        self.model, self.p = model, p
        self.eos = first_end(model, p.init)
        self.c0 = encode_text(model, [p.init]).float()                      # ψ(init) (1, 77, d)
        self.uncond = encode_text(model, [""]).float()                      # ψ("")
        self.rows = self.c0[0, 1:self.eos].clone()                          # what learns
        self.bound = max(self.c0.max().item(), self.uncond.max().item())    # gradient value clip
        self.image = instruct.image_latents(model, before)                 # E(before), unscaled
        self.z0 = encode(model, after)                                     # E(after) · scaling
        self.clip, self.direction = clip, None
        if clip is not None:
            width = clip.text_projection.weight.shape[1]
            if width != self.c0.shape[-1]:
                raise MinipError(f"the CLIP model's text width is {width}, this model's text "
                                 f"encoder's {self.c0.shape[-1]}; give the CLIP of its text "
                                 "encoder (openai/clip-vit-large-patch14 for SD 1.x)")
            self.direction = clip_direction(clip, (before + 1) / 2, (after + 1) / 2)
        T = model.scheduler.cfg.num_train_timesteps
        g = torch.Generator().manual_seed(p.seed)
        self.noises = torch.randn((T, *self.z0.shape[1:]), generator=g)  # ε_t, one per t
        self.order = torch.cat([torch.randperm(T, generator=g) for _ in range(-(-p.steps // T))])
        self.mse = float("inf")
        self.best_mse = torch.tensor(float("inf"))
        self.best_rows = self.rows.clone()
        self.best_step = torch.tensor(0)
        self.batch = GuidanceBatch.instruct_layout(1)

    def instruction(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """c_T (1, 77, d): BOS, the learned rows, then ψ(init)'s rows from EOS on."""
        rows = self.rows if rows is None else rows
        return torch.cat([self.c0[:, :1], rows[None], self.c0[:, self.eos:]], 1)

    def losses(self, t: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, its MSE part) at timestep t with noise ε_t (1, c, h, w)."""
        m, b = self.model, self.batch
        z_t = m.scheduler.add_noise(self.z0, noise.to(self.z0), t)
        c = self.instruction()
        context = b.context({TEXT: c, IMAGE: self.uncond, UNCOND: self.uncond})
        z_in = torch.cat([b.expand(z_t), b.image_cond(self.image)], dim=1)
        eps = m.unet(z_in.to(m.dtype), t, context.to(m.dtype)).float()
        eps = b.guide(eps, self.p.guidance, self.p.image_guidance)          # cfg_image
        mse = F.mse_loss(eps, m.scheduler.target(self.z0, noise.to(self.z0), t))
        loss = self.p.lambda_mse * mse
        if self.clip is not None and self.p.lambda_clip:
            w = self.clip.text_projection.weight.to(c)
            text = F.linear(c[0].mean(0), w)
            cos = torch.dot(self.direction.to(c), text / text.norm())
            loss = loss - self.p.lambda_clip * cos.clamp(-1, self.p.clip_max)
        return loss, mse

    def step(self, k: int, g: torch.Generator):
        t = int(self.order[k])
        loss, mse = self.losses(t, self.noises[t][None])
        self.mse = mse.item()
        return loss, {"mse": self.mse}

    def after(self, k: int) -> None:
        """Keep the rows of the lowest-MSE step (≤: a later tie wins, as the official code)."""
        if self.mse <= self.best_mse.item():
            self.best_mse.fill_(self.mse)
            self.best_rows.copy_(self.rows)
            self.best_step.fill_(k + 1)


def learn(model, p: Params, before, after, out: Path, clip=None, progress: bool = True):
    """Learn an instruction from BEFORE -> AFTER (files); write it to `out` (resumable from
    OUT.ckpt.safetensors). Returns c_T (1, 77, d) of the best step."""
    import hashlib
    from ..methods import instruct
    from ..real import images
    p.check()
    instruct.check_model(model)
    b, a = read_pair(before, after)
    height, width = instruct.default_size(model, b)
    xb, xa = (images.to_tensor(images.fit(im, height, width)) for im in (b, a))
    learner = Learner(model, p, xb, xa, clip)
    plan = loop.Plan(steps=p.steps, lr=p.lr, seed=p.seed, weight_decay=1e-2,
                     clip_value=learner.bound, save_every=p.save_every, progress=progress,
                     desc="learning the instruction")
    digest = hashlib.sha256(Path(before).read_bytes() + b"\0" + Path(after).read_bytes())
    settings = dict(method="visii", init=p.init, guidance=p.guidance,
                    image_guidance=p.image_guidance, lambda_mse=p.lambda_mse,
                    lambda_clip=p.lambda_clip if clip is not None else 0.0,
                    clip_max=p.clip_max, pair=digest.hexdigest(), model=model.name,
                    size=[height, width])
    loop.train({"rows": learner.rows}, learner.step, plan, loop.checkpoint_for(out), settings,
               learner.after, {"best_mse": learner.best_mse, "best_rows": learner.best_rows,
                               "best_step": learner.best_step})
    c = learner.instruction(learner.best_rows)
    save(out, c[0], learner.eos, p.init, int(learner.best_step), float(learner.best_mse))
    return c


def save(out: Path, embedding: torch.Tensor, eos: int, init: str, step: int, mse: float) -> Path:
    """{"instruction": c_T (77, d)}; metadata: format, eos (where the learned rows end), init."""
    from safetensors.torch import save_file
    from ..atomic import atomic_write
    meta = {"format": FORMAT, "eos": str(eos), "init": init, "step": str(step), "mse": f"{mse:.6g}"}
    tensors = {"instruction": embedding.detach().float().cpu().contiguous()}
    return atomic_write(Path(out), lambda tmp: save_file(tensors, tmp, metadata=meta))
