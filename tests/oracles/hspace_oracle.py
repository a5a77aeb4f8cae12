"""Test-only oracle: h-space editing as the official codes do it, re-written independently on
diffusers' UNet (no minip2p code).

* `unet_h`: semantic-diffusion's `forward` (h_space="after"): down blocks, mid block, h = its
  output, h + delta_h through the up blocks with the skips of the unedited down path; returns
  (ε, h).
* `denoising_step`: Asyrp's `utils/diffusion_utils.py::denoising_step` for DDIM: x0_t from the
  modified ε, the direction from the original ε, η = 0 or the c1/c2 form with noise; ᾱ_next of
  the scheduler (final_alpha_cumprod after the last step, SD's, where Asyrp's DDPM code uses 1).
* `asyrp_loop`: that step at every timestep, both ε classifier-free guided (Δh in the ∅ and the
  c call), Δh only at t ≥ t_edit, η = 1 below t_boost with noise from the given generator.
* `pca_indv`: `editing/pca.py` SVDViaKernelMatrix + get_PCs_indv + the sign fixes
  (fix_sign_ambiguity, make_sure_vecs_point_in_same_direction).
* `pullback`: Diffusion-Pullback's `local_encoder_pullback_zt` (jacfwd over a scalar a of
  h(z + a·v_i), then `torch.autograd.functional.jacobian` of Σ u·h, SVD), with the initial V
  from a given generator and a fixed number of iterations; `x_space_guidance`.
"""
from __future__ import annotations

import torch


def unet_h(unet, x, t, ctx, delta_h=None):
    emb = unet.time_embedding(unet.time_proj(torch.as_tensor(t).reshape(-1).expand(x.shape[0]))
                              .to(x.dtype))
    sample = unet.conv_in(x)
    res = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, r = block(hidden_states=sample, temb=emb, encoder_hidden_states=ctx)
        else:
            sample, r = block(hidden_states=sample, temb=emb)
        res += r
    sample = unet.mid_block(sample, emb, encoder_hidden_states=ctx)
    h = sample.clone()
    if delta_h is not None:
        sample = h + delta_h
    for block in unet.up_blocks:
        r, res = res[-len(block.resnets):], res[:-len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=r,
                           encoder_hidden_states=ctx)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=r)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    return sample, h


def denoising_step(xt, et, et_modified, at, at_next, eta=0.0, noise=None):
    x0_t = (xt - et_modified * (1 - at).sqrt()) / at.sqrt()
    if eta == 0:
        return at_next.sqrt() * x0_t + (1 - at_next).sqrt() * et
    c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
    c2 = ((1 - at_next) - c1 ** 2).sqrt()
    return at_next.sqrt() * x0_t + c2 * et + c1 * noise


@torch.no_grad()
def asyrp_loop(pipe, x, cond, uncond, steps, scale, delta_hs=None, t_edit=0, t_boost=0,
               gen=None, asyrp=True):
    """-> (x_0, hs of the ∅ call per step (steps, C, H, W) as semantic-diffusion records).
    asyrp=False: semantic-diffusion's default, the edited ε in both terms."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod
    hs = []
    for i, t in enumerate(sched.timesteps):
        prev = int(t) - 1000 // steps
        at, at_next = ac[t], ac[prev] if prev >= 0 else sched.final_alpha_cumprod
        eu, hu = unet_h(pipe.unet, x, t, uncond)
        ec, _ = unet_h(pipe.unet, x, t, cond)
        hs.append(hu[0])
        et = eu + scale * (ec - eu)
        et_mod = et
        if delta_hs is not None and t >= t_edit:
            eu2, _ = unet_h(pipe.unet, x, t, uncond, delta_hs[i])
            ec2, _ = unet_h(pipe.unet, x, t, cond, delta_hs[i])
            et_mod = eu2 + scale * (ec2 - eu2)
            et = et if asyrp else et_mod
        eta = 1.0 if t < t_boost else 0.0
        noise = torch.randn(x.shape, generator=gen) if eta else None
        x = denoising_step(x, et, et_mod, at, at_next, eta, noise)
    return x, torch.stack(hs)


def _kernel_svd(X):
    X = X.double()
    X = X - X.mean(0)
    V, S, _ = torch.linalg.svd(X @ X.T)
    svals = S ** 0.5
    Ut = torch.diag(svals ** -1) @ V.T @ X
    Ut = torch.cat([(-x if torch.sign(x[0]) == -1 else x)[None] for x in Ut])
    return Ut, svals


def pca_indv(hhs, num_svectors):
    """hhs (N, I, C, H, W) -> PCs (num_svectors, I, C, H, W), as get_PCs_indv, then every
    step's vector pointing like the first step's."""
    N, I = hhs.shape[:2]
    Uts, ss = [], []
    for i in range(I):
        Ut, svals = _kernel_svd(hhs[:, i].reshape(N, -1))
        Uts.append(Ut[:num_svectors])
        ss.append(svals[:num_svectors][None])
    ss = torch.cat(ss).T / (N - 1) ** 0.5
    Uts = torch.stack(Uts, 1).float()                                  # (k, I, D)
    for j in range(Uts.shape[0]):
        for i in range(1, I):
            if (Uts[j, 0] * Uts[j, i]).sum() < 0:
                Uts[j, i] = -Uts[j, i]
    PCs = torch.zeros_like(Uts)
    for j in range(Uts.shape[0]):
        for i in range(I):
            PCs[j, i] = ss[j, i] * Uts[j, i]
    return PCs.reshape(num_svectors, I, *hhs.shape[2:]), ss


def pullback(unet, sample, t, ctx, rank, iters, gen):
    get_h = lambda x: unet_h(unet, x, t, ctx.repeat(x.shape[0], 1, 1))[1]
    c_i, w_i, h_i = sample.shape[1:]
    vT, _ = torch.linalg.qr(torch.randn(c_i * w_i * h_i, rank, generator=gen))
    v = vT.T.view(-1, c_i, w_i, h_i)
    for _ in range(iters):
        a = torch.tensor(0.)
        g = lambda a: get_h(sample + a * v)
        u = torch.func.jacfwd(g, argnums=0, has_aux=False, randomness="error")(a)
        g = lambda s: torch.einsum("bcwh,icwh->b", u, get_h(s))
        v_ = torch.autograd.functional.jacobian(g, sample).view(-1, c_i * w_i * h_i)
        _, s, v = torch.linalg.svd(v_, full_matrices=False)
        v = v.view(-1, c_i, w_i, h_i)
    return u, s.sqrt(), v


@torch.no_grad()
def x_space_guidance(unet, zt, t, ctx, vk, n):
    for _ in range(n):
        et = unet(torch.cat([zt, zt + vk]), t, encoder_hidden_states=ctx.repeat(2, 1, 1)).sample
        et_null, et_edit = et.chunk(2)
        zt = zt + (et_edit - et_null)
    return zt
