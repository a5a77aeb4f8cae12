"""Textual inversion (Gal et al., ICLR 2023): a new word S* learned from a few pictures, through a
frozen model.

A new token S* ("<my-thing>", standing for n vectors v_1 … v_n: "<my-thing>", "<my-thing>_1", …)
gets new rows of the text encoder's token table E; only those rows learn:

    v* = argmin_v  E_{x, y, ε, t} ‖ ε − ε_θ(z_t, t, ψ(y(S*))) ‖²
         z_0 = E_vae(x) (a posterior sample) · scaling,  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε,
         t ~ U{0 … 999},  y = a random template ("a photo of a {}") with S* in it,
         x = one of the pictures, flipped left-right with probability ½

(v-prediction models learn v = √ᾱ_t ε − √(1−ᾱ_t) z_0 instead of ε: DDIM.target.) AdamW, weight
decay 1e-2, constant learning rate, as diffusers' `examples/textual_inversion/textual_inversion.py`.

Initialisation: v_i = E[init token] -- the TOKEN embedding alone, diffusers' convention. The
original code (rinongal/textual_inversion) starts from `embeddings(token)`, which has position 0's
embedding added in; but the rows live in the token table, and every prompt adds the position
embedding of wherever S* stands, as it does for the init word. So with diffusers' start "a S*"
encodes exactly as "a WORD" at step 0, and the saved rows mean the same thing to diffusers'
`load_textual_inversion` and to our `--embedding`. An init phrase of k ≤ n tokens starts v_i from
its i-th token (the last one repeated when k < n); the official code takes one token only.

Where we differ from the official code, on purpose:
  - it runs AdamW over the whole table and copies every row but S*'s back after each step. AdamW
    is elementwise, so S*'s rows move exactly as when AdamW is given them alone; we give it them
    alone (`rows`, spliced into E for the forward by torch.func.functional_call), so a checkpoint
    holds n rows and their moments, not the 49,408-row table (the test checks the update equal
    to the official whole-table step).
  - pictures are centre-cropped to a square (real/images.fit), then resized (bicubic) to the
    model's native size; diffusers squeezes a non-square picture unless --center_crop.
  - every random number (picture, template, flip, VAE sample, ε, t) comes from the trainer loop's
    generator, so a run stopped and resumed equals one run.
  - the template set is a parameter: the official object and style sets, or your own (the toy
    model knows captions such as "a {}", not photographs).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MinipError, ParameterError
from . import loop

# diffusers' `imagenet_templates_small` and `imagenet_style_templates_small`
OBJECT = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}",
          "the photo of a {}", "a photo of a clean {}", "a photo of a dirty {}",
          "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
          "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
          "a photo of the {}", "a good photo of the {}", "a photo of one {}",
          "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
          "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}",
          "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
          "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}"]
STYLE = ["a painting in the style of {}", "a rendering in the style of {}",
         "a cropped painting in the style of {}", "the painting in the style of {}",
         "a clean painting in the style of {}", "a dirty painting in the style of {}",
         "a dark painting in the style of {}", "a picture in the style of {}",
         "a cool painting in the style of {}", "a close-up painting in the style of {}",
         "a bright painting in the style of {}", "a cropped painting in the style of {}",
         "a good painting in the style of {}", "a close-up painting in the style of {}",
         "a rendition in the style of {}", "a nice painting in the style of {}",
         "a small painting in the style of {}", "a weird painting in the style of {}",
         "a large painting in the style of {}"]
TEMPLATES = {"object": OBJECT, "style": STYLE}
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TABLE = "text_model.embeddings.token_embedding.weight"


@dataclass
class Params:
    """What textual inversion learns and how (diffusers' README recipe for SD 1.x: batch 1 ×
    4 accumulated, lr 5e-4 scaled by 4, 3000 steps)."""
    token: str                                  # the new word, e.g. "<my-thing>"
    init: str                                   # the word (or words) its rows start from
    vectors: int = 1                            # n: vectors the token stands for
    steps: int = 3000
    lr: float = 2e-3
    batch: int = 4
    what: str = "object"                        # object | style: the official template set
    templates: list[str] = field(default_factory=list)   # your own instead ("a {}")
    flip: float = 0.5                           # probability of a left-right flip
    seed: int = 0
    save_every: int = 100

    def check(self) -> None:
        if not self.token.strip() or any(c.isspace() for c in self.token):
            raise ParameterError("token", f"must be one word without spaces, got {self.token!r}")
        if self.vectors < 1:
            raise ParameterError("vectors", f"must be ≥ 1, got {self.vectors}")
        if self.batch < 1:
            raise ParameterError("batch", f"must be ≥ 1, got {self.batch}")
        if self.what not in TEMPLATES:
            raise ParameterError("what", f"must be object or style, got {self.what!r}")
        if not 0 <= self.flip <= 1:
            raise ParameterError("flip", f"must be a probability in [0, 1], got {self.flip}")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ParameterError("templates", f"{t!r} must hold the word's place once, "
                                                  "as {} (e.g. \"a {}\")")

    def template_list(self) -> list[str]:
        return list(self.templates) or TEMPLATES[self.what]


def read_pictures(folder, height: int, width: int) -> tuple[list[torch.Tensor], str]:
    """Every picture of `folder` as x (1, 3, H, W) in [−1, 1], and a digest of their bytes. The
    folder must hold pictures only (hidden files aside): anything else is a one-line refusal."""
    from ..real import images
    folder = Path(folder)
    if not folder.is_dir():
        raise MinipError(f"'{folder}' is not a folder; give the folder of pictures to learn from")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    others = [p for p in files if p.suffix.lower() not in PICTURE_SUFFIXES or not p.is_file()]
    if others:
        raise MinipError(f"'{others[0]}' is not a picture ({', '.join(PICTURE_SUFFIXES)}); the "
                         "folder must hold only the pictures to learn from")
    if not files:
        raise MinipError(f"'{folder}' holds no pictures ({', '.join(PICTURE_SUFFIXES)}); put "
                         "the pictures of the thing to learn there")
    digest = hashlib.sha256()
    pictures = []
    for p in files:
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
        pictures.append(images.to_tensor(images.fit(images.open_image(p), height, width)))
    return pictures, digest.hexdigest()


def init_rows(model, init: str, n: int) -> torch.Tensor:
    """(n, d): v_i = E[token i of `init`] (the last token repeated); `init` of > n tokens refused."""
    ids = model.tokenizer.tokenize(init)
    if not ids:
        raise ParameterError("init", f"{init!r} has no tokens; give a word the new one starts from")
    if len(ids) > n:
        raise ParameterError("init", f"{init!r} is {len(ids)} tokens but the new word has {n} "
                                     f"vector{'s' * (n > 1)}; give a shorter phrase or set "
                                     "{vectors} to at least " + str(len(ids)))
    E = model.text_encoder.text_model.embeddings.token_embedding.weight
    return E[[ids[min(i, len(ids) - 1)] for i in range(n)]].detach().float().clone()


class Learner:
    """S*'s rows and the loss of one batch; `step(k, g)` draws the batch from g."""

    def __init__(self, model, p: Params, pictures: list[torch.Tensor]):
        from ..load.embeddings import add_token
        self.model, self.p, self.pictures = model, p, pictures
        self.templates = p.template_list()
        taken = [w for w in [p.token] + [f"{p.token}_{i}" for i in range(1, p.vectors)]
                 if model.tokenizer.knows(w)]
        if taken:
            raise ParameterError("token", f"{taken[0]!r} is already a word of the vocabulary; "
                                          "choose a new one, such as <my-thing>")
        rows = init_rows(model, p.init, p.vectors)
        ids = add_token(model, p.token, rows, source=f"token {p.token!r}")
        if ids != list(range(ids[0], ids[0] + len(ids))) or \
                ids[-1] + 1 != model.text_encoder.cfg.vocab_size:
            raise MinipError(f"the tokenizer gave {p.token!r} ids {ids}, not the table's last "
                             "rows; load the model afresh")
        E = model.text_encoder.text_model.embeddings.token_embedding.weight
        self.base = E[:ids[0]].detach()                       # E without S*'s rows: frozen
        self.rows = rows.to(model.device)                     # v_1 … v_n: what learns

    def table(self) -> torch.Tensor:
        return torch.cat([self.base, self.rows.to(self.base.dtype)])

    def loss(self, prompts: list[str], z0, noise, t) -> torch.Tensor:
        """MSE(ε_θ(z_t, t, ψ(y)), ε) (or v) of one batch, differentiable in `rows`."""
        m = self.model
        ids = m.tokenizer(prompts).to(m.device)
        c = torch.func.functional_call(m.text_encoder, {TABLE: self.table()}, (ids,))
        z_t = m.scheduler.add_noise(z0, noise, t)
        pred = m.unet(z_t.to(m.dtype), t.to(m.device), c)
        return F.mse_loss(pred.float(), m.scheduler.target(z0, noise, t).float())

    def draw(self, g: torch.Generator):
        """A batch: prompts, z_0 (a VAE posterior sample · scaling), ε and t, all from g."""
        m, B = self.model, self.p.batch
        pick = torch.randint(len(self.pictures), (B,), generator=g).tolist()
        words = torch.randint(len(self.templates), (B,), generator=g).tolist()
        flip = (torch.rand(B, generator=g) < self.p.flip).tolist()
        x = torch.cat([self.pictures[i].flip(-1) if f else self.pictures[i]
                       for i, f in zip(pick, flip)])
        with torch.no_grad():
            z0 = m.vae.encode(x.to(m.device, m.dtype), sample=True, generator=g).float()
        z0 = z0 * m.vae.cfg.scaling_factor
        noise = torch.randn(z0.shape, generator=g).to(z0.device)
        t = torch.randint(0, m.scheduler.cfg.num_train_timesteps, (B,), generator=g)
        return [self.templates[w].format(self.p.token) for w in words], z0, noise, t

    def step(self, k: int, g: torch.Generator) -> torch.Tensor:
        return self.loss(*self.draw(g))


def learn(model, p: Params, folder, out: Path, progress: bool = True) -> torch.Tensor:
    """Learn S* from the pictures in `folder`; write {token: (n, d)} to `out` (resumable from
    OUT.ckpt.safetensors). Returns the rows."""
    from ..pipeline import check_size
    p.check()
    height, width = check_size(model, None, None)
    pictures, digest = read_pictures(folder, height, width)
    learner = Learner(model, p, pictures)
    plan = loop.Plan(steps=p.steps, lr=p.lr, seed=p.seed, weight_decay=1e-2,
                     save_every=p.save_every, progress=progress, desc=f"learning {p.token}")
    settings = dict(method="textual-inversion", token=p.token, init=p.init, vectors=p.vectors,
                    batch=p.batch, templates=learner.templates, flip=p.flip, pictures=digest,
                    model=model.name, size=[height, width])
    loop.train({"rows": learner.rows}, learner.step, plan, loop.checkpoint_for(out), settings)
    save(out, p.token, learner.rows)
    with torch.no_grad():                      # the model now knows S* as learned
        E = model.text_encoder.text_model.embeddings.token_embedding.weight
        E[len(learner.base):] = learner.rows.to(E)
    return learner.rows


def save(out: Path, token: str, rows: torch.Tensor) -> Path:
    """diffusers' `learned_embeds.safetensors`: {token: (n, d)}, metadata {"format": "pt"}."""
    from safetensors.torch import save_file
    from ..atomic import atomic_write
    tensors = {token: rows.detach().float().cpu().contiguous()}
    return atomic_write(Path(out), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
