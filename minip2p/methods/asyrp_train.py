"""Asyrp's trained direction: a small network f_t(h) gives Δh_t, learned with CLIP's directional
loss on DDIM-inverted pictures (Kwon et al. 2023, kwonminki/Asyrp_official `DeltaBlock`,
`diffusion_latent.py::run_training`, `losses/clip_loss.py`).

    f_t(h) = conv₁ₓ₁(SiLU(GN(conv₁ₓ₁(SiLU(GN(h))) + W·SiLU(temb_t))))     (Dropout 0; default init)

temb_t is the UNet's own time embedding. Training, for each picture x_0 (its DDIM inversion z_T
under the source prompt), at each timestep t ≥ t_edit of the `steps` schedule, high to low:

    ε, ε̃ = ε_θ(z_t), ε_θ(z_t | h + f_t(h))        (one call, methods/hspace.py; CFG on both)
    P_t = (z_t − √(1−ᾱ_t)·ε̃)/√ᾱ_t,   P_t^orig the same from the unedited trajectory's ε
    L_dir = 1 − cos(normalize(E_I(D(P_t)) − E_I(x_0)), ΔT),
    ΔT = normalize(mean over templates of E_T(target) − E_T(source))     (each E normalised)
    L = −log((2 − L_dir)/2) + λ_L1·cos(E_T(src), E_T(trg))·mean|P_t − P_t^orig|
    one SGD step (lr 0.5, the official scripts), then z_{t−1} by the asymmetric step, detached

over `epochs` (5) passes, the learning rate × γ (0.1) every `step_size` (3) epochs (StepLR).

Differences on purpose: latent diffusion, so P_t is decoded through the VAE (with gradients) for
CLIP and the L1 term is taken on the latents; four text templates of our own, not ImageNet's 80;
CFG with the source prompt on both trajectories (Asyrp's models are unconditional).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import MinipError

TEMPLATES = ("{}", "a picture of {}.", "a rendering of {}.", "an image showing {}.")


class DeltaBlock(nn.Module):
    """f_t: (h (b, C, H, W), temb (b, E)) -> Δh (b, C, H, W), as the official DeltaBlock."""

    def __init__(self, channels: int, temb_channels: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, channels, 1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb_channels, channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                        nn.Dropout(0.0), nn.Conv2d(channels, channels, 1))

    def forward(self, h, temb):
        return self.out_layers(self.in_layers(h) + self.emb_layers(temb)[:, :, None, None])


def new_block(unet) -> DeltaBlock:
    c = unet.cfg.block_out_channels
    return DeltaBlock(c[-1], c[0] * 4, 32 if c[-1] % 32 == 0 else unet.cfg.norm_num_groups)


def temb(unet, t: int, rows: int) -> torch.Tensor:
    """The UNet's time embedding of t for `rows` rows (b, 4·c0)."""
    from ..model.unet import timestep_embedding
    e = timestep_embedding(torch.full((rows,), t), unet.cfg.block_out_channels[0],
                           unet.cfg.flip_sin_to_cos, unet.cfg.freq_shift)
    return unet.time_embedding(e.to(unet.conv_in.weight))


def delta_of(unet, f: DeltaBlock, scale: float = 1.0):
    """delta(h, step, t) for methods/asyrp.edit: f_t(h) × scale."""
    return lambda h, step, t: f(h, temb(unet, t, h.shape[0])) * scale


def text_direction(clip, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔT (1, d) normalised, cos(E_T(source), E_T(target)))."""
    src = clip.encode_texts([t.format(source) for t in TEMPLATES])
    trg = clip.encode_texts([t.format(target) for t in TEMPLATES])
    d = (trg - src).mean(0, keepdim=True)
    cos = F.cosine_similarity(clip.encode_texts([source]), clip.encode_texts([target])).item()
    return d / d.norm(dim=-1, keepdim=True), cos


def clip_image(clip, x: torch.Tensor) -> torch.Tensor:
    """Pictures in [−1, 1] -> normalised E_I, with gradients."""
    f = clip.visual_projection(clip.vision_model(clip.preprocess((x + 1) / 2)))
    return f / f.norm(dim=-1, keepdim=True)


def directional_loss(clip, x0: torch.Tensor, x_edit: torch.Tensor, dT: torch.Tensor):
    """L_dir = 1 − cos(normalize(E_I(x_edit) − E_I(x0)), ΔT); pictures in [−1, 1]."""
    dI = clip_image(clip, x_edit) - clip_image(clip, x0).detach()
    dI = dI / dI.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1 - F.cosine_similarity(dI, dT)


def train(model, clip, pictures: list[torch.Tensor], source: str, target: str,
          t_edit: int = 500, steps: int = 50, epochs: int = 5, lr: float = 0.5,
          step_size: int = 3, gamma: float = 0.1, l1_weight: float = 3.0,
          guidance: float = 7.5, seed: int = 0, progress: bool = True) -> DeltaBlock:
    """Learn f_t on `pictures` ((1, 3, H, W) in [−1, 1] each) for source -> target."""
    from ..pipeline import encode_text
    from ..real.images import encode
    from ..real.invert import ddim_invert
    from .hspace import HShift
    torch.manual_seed(seed)
    unet, sched = model.unet, model.scheduler
    for p in list(unet.parameters()) + list(model.vae.parameters()) + list(clip.parameters()):
        p.requires_grad_(False)
    f = new_block(unet).to(model.device)
    opt = torch.optim.SGD(f.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    with torch.no_grad():
        dT, cos = text_direction(clip, source, target)
        cond, uncond = encode_text(model, [source]), encode_text(model, [""])
        starts = [ddim_invert(model, encode(model, (x + 1) / 2), cond, steps,
                              progress=False)[-1] for x in pictures]
    from ..guidance import TEXT, UNCOND, GuidanceBatch
    batch = GuidanceBatch.cfg_layout(1)
    context = batch.context({UNCOND: uncond, TEXT: cond})
    all_t = sched.timesteps(steps)
    timesteps = [t for t in all_t if t >= t_edit]
    step_of = {t: i for i, t in enumerate(all_t)}
    shift = HShift(lambda h, step: f(h, temb(unet, all_t[step], h.shape[0])), [1.0])
    losses = []
    for epoch in range(epochs):
        for x0, z_T in tqdm(list(zip(pictures, starts)), disable=not progress,
                            desc=f"f_t epoch {epoch + 1}/{epochs}"):
            z = z_orig = z_T.float()
            for t in timesteps:
                a = sched.alpha(t)
                eps2 = unet(batch.expand(z.detach()), t, context, control=shift,
                            step=step_of[t], batch=batch).float()
                eps, eps_edit = batch.guide(eps2[:2], guidance), batch.guide(eps2[2:], guidance)
                P = (z - (1 - a) ** 0.5 * eps_edit) / a ** 0.5
                with torch.no_grad():
                    eps_o = batch.guide(unet(batch.expand(z_orig), t, context).float(), guidance)
                    P_orig = (z_orig - (1 - a) ** 0.5 * eps_o) / a ** 0.5
                picture = model.vae.decode(P / model.vae.cfg.scaling_factor)
                l_dir = directional_loss(clip, x0, picture, dT).mean()
                loss = -torch.log((2 - l_dir) / 2) + l1_weight * cos * (P - P_orig).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                with torch.no_grad():
                    z = sched.step(eps_edit.detach(), t, z.detach(), steps, direction=eps.detach())
                    z_orig = sched.step(eps_o, t, z_orig, steps)
        lr_sched.step()
    f.losses = losses
    return f.eval()


def save(f: DeltaBlock, path, **meta) -> Path:
    from safetensors.torch import save_file

    from ..atomic import atomic_write
    tensors = {k: v.detach().float().contiguous() for k, v in f.state_dict().items()}
    info = {"kind": "ft", "channels": str(f.in_layers[2].in_channels),
            "temb": str(f.emb_layers[1].in_features), "groups": str(f.in_layers[0].num_groups),
            **{k: str(v) for k, v in meta.items()}}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=info))
    return Path(path)


def load(path) -> tuple[DeltaBlock, dict]:
    """A saved f_t, strictly: (DeltaBlock, metadata)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("kind") != "ft":
        raise MinipError(f"{path}: not a trained f_t file")
    f = DeltaBlock(int(meta["channels"]), int(meta["temb"]), int(meta["groups"]))
    mine = f.state_dict()
    if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
        raise MinipError(f"{path}: the f_t tensors do not match a DeltaBlock of "
                         f"{meta['channels']} channels")
    f.load_state_dict(state)
    return f.eval(), meta
