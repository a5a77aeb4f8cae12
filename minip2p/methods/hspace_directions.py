"""Directions in h-space without training, and the file that holds them.

PCA (Haas et al. 2023, renhaa/semantic-diffusion `editing/pca.py`): generate N images, keep h_t
of every step (the unconditional row's h, as their SD code records it), and per timestep take
the centred PCA of X_t (N × D) through the kernel matrix X_t X_tᵀ = V S Vᵀ (float64):
singular values s = √S, principal directions U = diag(s)⁻¹ Vᵀ X_t, each signed so that its
first element is positive, then flipped where needed to point like the first step's. Δh:

    Δh_{k,t} = α · (s_{k,t} / √(N−1)) · U_{k,t}                 added at every step (α: strength)

Prompt pair: Δh_t = mean over seeds of h_t(target) − h_t(source), the conditional rows' h along
each prompt's own trajectory from the same noises.

Pullback (Park et al. 2023, enkeejunior1/Diffusion-Pullback `local_encoder_pullback_zt`): the
top right singular vectors of J = ∂h/∂z_t at one z_t, by subspace iteration: random orthonormal
V (rank columns, QR), then repeat: u_i = J v_i (forward mode, `torch.func.jvp`), the rows
Jᵀu_i (reverse mode), V ← right singular vectors of [Jᵀu_i], until V moves less than `tol`
(after `min_iter`). σ = √(singular values). Their edit (`x_space_guidance`, no CFG, the
conditional prompt): repeat z ← z + (ε(z + v_k) − ε(z)), then DDIM to 0 (methods/asyrp.py).

File (safetensors): "directions" (K, T, C, H, W) per timestep, or (K, 4, h, w) for pullback;
"timesteps" (T,); "values" singular values; metadata: kind, prompt, steps, guidance, samples…
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MinipError
from .hspace import HRecorder, sample

KINDS = ("pca", "prompts", "pullback")


@dataclass
class Directions:
    kind: str
    vectors: torch.Tensor                  # (K, T, C, H, W); pullback (K, 4, h, w)
    timesteps: list[int]
    values: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def delta(self, k: int, t: int, steps: int) -> torch.Tensor:
        """Δh of direction k at timestep t of a `steps`-step run: the nearest stored timestep,
        × n_made / steps (the official n_train_step / n_test_step)."""
        i = min(range(len(self.timesteps)), key=lambda j: abs(self.timesteps[j] - t))
        return self.vectors[k, i] * (len(self.timesteps) / steps)


def save(d: Directions, path) -> Path:
    from safetensors.torch import save_file

    from ..atomic import atomic_write
    tensors = {"directions": d.vectors.float().contiguous(),
               "timesteps": torch.tensor(d.timesteps, dtype=torch.int64)}
    if d.values is not None:
        tensors["values"] = d.values.float().contiguous()
    meta = {"kind": d.kind, **{k: str(v) for k, v in d.meta.items()}}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))
    return Path(path)


def kind_of(path) -> str:
    """The kind a directions file says it holds ("pca", "prompts", "pullback", or "ft": a
    trained f_t, methods/asyrp_train.py), checked to be a readable safetensors file."""
    return _read(path)[0].get("kind", "")


def _read(path):
    from safetensors import safe_open
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MinipError(f"{path}: directions are read from .safetensors files only")
    if not path.is_file():
        raise MinipError(f"{path}: no such directions file")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                                  # not a safetensors file
        raise MinipError(f"{path}: not a safetensors directions file ({e})") from None


def load(path) -> Directions:
    meta, tensors = _read(path)
    keys = set(tensors)
    if meta.get("kind") not in KINDS or not {"directions", "timesteps"} <= keys or \
            keys - {"directions", "timesteps", "values"}:
        raise MinipError(f"{path}: not a directions file of `minip2p hspace` (kind "
                         f"{meta.get('kind')!r}, tensors {sorted(keys)})")
    return Directions(meta.pop("kind"), tensors["directions"].float(),
                      tensors["timesteps"].tolist(), tensors.get("values"), meta)


def _h_of(model, prompt: str, seeds: list[int], steps: int, guidance: float, chunk: int,
          progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h of the unconditional rows, h of the conditional rows), each (N, steps, C, H, W)."""
    from ..pipeline import check_size, encode_text, initial_noise
    height, width = check_size(model, None, None)
    cond, uncond = encode_text(model, [prompt]), encode_text(model, [""])
    hu, hc = [], []
    for i in tqdm(range(0, len(seeds), chunk), disable=not progress, desc="h of samples"):
        part = seeds[i:i + chunk]
        z = torch.cat([initial_noise(model, s, height, width) for s in part])
        rec = HRecorder()
        sample(model, cond.expand(len(part), -1, -1), uncond, z, steps, guidance, record=rec)
        hu.append(rec.stacked("uncond"))
        hc.append(rec.stacked("text"))
    return torch.cat(hu), torch.cat(hc)


def pca(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred PCA of X (N, D) through the kernel matrix: (U (k, D) signed, s (k,))."""
    X = X.double()
    X = X - X.mean(0)
    V, S, _ = torch.linalg.svd(X @ X.T)
    s = S[:k] ** 0.5
    U = torch.diag(1 / s) @ V[:, :k].T @ X
    U = U * torch.where(U[:, :1] < 0, -1.0, 1.0)                    # first element positive
    return U, s


def pca_directions(H: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h of N samples over T steps (N, T, C, H, W) -> (Δh (k, T, C, H, W) = s/√(N−1)·U, the
    scaled singular values (k, T)), PCA per step, every step's U_k pointing like step 0's."""
    N, T = H.shape[:2]
    if not 1 <= k < N - 1:
        raise MinipError(f"{k} components need at least {k + 2} samples, got {N}")
    Us, ss = zip(*(pca(H[:, i].reshape(N, -1), k) for i in range(T)))
    U, s = torch.stack(Us, 1), torch.stack(ss, 1)                       # (k, T, D), (k, T)
    U = U * torch.where((U * U[:, :1]).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    s = s / (N - 1) ** 0.5
    return (s[..., None] * U).float().reshape(k, T, *H.shape[2:]), s.float()


def make_pca(model, prompt: str, samples: int = 64, k: int = 5, steps: int = 50,
             guidance: float = 7.5, seed: int = 0, chunk: int = 16,
             progress: bool = True) -> Directions:
    hu, _ = _h_of(model, prompt, list(range(seed, seed + samples)), steps, guidance, chunk,
                  progress)
    vectors, values = pca_directions(hu, k)
    return Directions("pca", vectors, model.scheduler.timesteps(steps), values,
                      dict(prompt=prompt, samples=samples, steps=steps, guidance=guidance))


def make_prompts(model, source: str, target: str, samples: int = 64, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0, chunk: int = 16,
                 progress: bool = True) -> Directions:
    seeds = list(range(seed, seed + samples))
    _, h_src = _h_of(model, source, seeds, steps, guidance, chunk, progress)
    _, h_trg = _h_of(model, target, seeds, steps, guidance, chunk, progress)
    return Directions("prompts", (h_trg.mean(0) - h_src.mean(0))[None],
                      model.scheduler.timesteps(steps), None,
                      dict(prompt=source, target=target, samples=samples, steps=steps,
                           guidance=guidance))


def pullback(h_of, z: torch.Tensor, rank: int = 2, max_iter: int = 50, min_iter: int = 10,
             tol: float = 1e-4, seed: int = 0):
    """Top right singular vectors of J = ∂h/∂z at z (1, c, h, w) by subspace iteration:
    (u (rank, *h), σ (rank,), v (rank, c, h, w)); `h_of(z)` -> h (1, C, H, W)."""
    from torch.func import jvp, vjp
    D = z[0].numel()
    gen = torch.Generator("cpu").manual_seed(int(seed))
    V, _ = torch.linalg.qr(torch.randn(D, rank, generator=gen, dtype=torch.float32))
    v = V.T.reshape(rank, *z.shape[1:]).to(z)
    for i in range(max_iter):
        v_prev = v
        u = torch.cat([jvp(h_of, (z,), (vi[None],))[1] for vi in v])    # u_i = J v_i
        _, pull = vjp(h_of, z)
        JTu = torch.cat([pull(ui[None])[0] for ui in u]).reshape(rank, D)  # rows Jᵀ u_i
        _, s, Vh = torch.linalg.svd(JTu, full_matrices=False)
        v = Vh.reshape(rank, *z.shape[1:])
        if torch.allclose(v_prev, v, atol=tol) and i > min_iter:
            break
    return u.detach(), s.sqrt().detach(), v.detach()


def make_pullback(model, prompt: str, seed: int = 0, steps: int = 50, t_edit: int = 600,
                  rank: int = 5, guidance: float = 7.5, max_iter: int = 50,
                  progress: bool = True) -> Directions:
    """v_k at z_t of (prompt, seed), t the timestep nearest t_edit (their 0.6–0.7 T):
    DDIM with guidance to z_t, then the pullback of h(z_t) under the prompt (no CFG)."""
    from ..fast import switched
    from ..pipeline import check_size, encode_text, initial_noise, sample as pipeline_sample
    timesteps = model.scheduler.timesteps(steps)
    step = min(range(steps), key=lambda i: abs(timesteps[i] - t_edit))
    height, width = check_size(model, None, None)
    cond, uncond = encode_text(model, [prompt]), encode_text(model, [""])
    z = initial_noise(model, seed, height, width)
    for i, t, z_next in pipeline_sample(model, cond, uncond, z, steps, guidance, progress=False):
        if i == step:
            break
        z = z_next
    t = timesteps[step]
    with switched(model, False), torch.enable_grad():       # forward-mode AD: explicit attention
        u, s, v = pullback(lambda x: model.unet.encode(x.to(model.dtype), t, cond)[0].float(),
                           z.float().to(model.device), rank, max_iter)
    return Directions("pullback", v.cpu(), [t], s.cpu(),
                      dict(prompt=prompt, seed=seed, steps=steps, step=step, guidance=guidance))
