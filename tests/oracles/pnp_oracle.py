"""Test-only oracle: the official plug-and-play code, re-written independently.

A second, separate reading of MichalGeyer/pnp-diffusers (`preprocess.py` Preprocess.ddim_inversion
and extract_latents, `pnp.py` PNP.denoise_step / init_pnp / run_pnp, `pnp_utils.py` register_time,
register_attention_control_efficient, register_conv_control_efficient). It shares no code with
minip2p: it runs on diffusers' UNet, transformers' CLIP and diffusers' DDIMScheduler, and keeps the
official mechanics on purpose:

* the injection schedules are lists of *timesteps* (`scheduler.timesteps[:int(N·τ)]`), and a layer
  injects when the current timestep `t` (set on it before each UNet call) is in its list;
* the batch is the official 3-row one, [source, target, target] with the embeddings
  ["", negative prompt, prompt], and the injection copies the first third of the rows into the
  other two thirds, in place: the residual branch after conv2 of up_blocks[1].resnets[1] (here a
  forward hook on that conv2), and q and k of the self-attention of up_blocks[1].attentions[1, 2],
  up_blocks[2] and up_blocks[3] (here an attention processor with the official explicit softmax);
* the source row at timestep t is the inversion latent saved for t, and the edit starts from the
  latent saved for the first timestep.

Departures, each stated: the inversion runs on the edit's own N-step schedule (the official
preprocess defaults to 999 steps and the edit reads the 50 it needs), as minip2p does; the image
is given in [−1, 1] rather than loaded from a file; and the source row's DDIM step, which the
official code discards, is kept so that the source's reconstruction can be compared too.
"""
from __future__ import annotations

import contextlib

import torch

ATTN_LAYERS = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}   # up_blocks[res].attentions[block]


def text_embeds(pipe, texts):
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def scheduler_for(pipe, steps):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def invert(pipe, x, inversion_prompt, steps):
    """preprocess.py: encode (posterior mean · 0.18215), then ddim_inversion with cond = the
    inversion prompt's embedding (no guidance). Returns (z_0, {t: latent saved for t})."""
    sched = scheduler_for(pipe, steps)
    latent = pipe.vae.encode(x).latent_dist.mean * 0.18215
    z0, cond, saved = latent, text_embeds(pipe, [inversion_prompt]), {}
    timesteps = reversed(sched.timesteps)
    for i, t in enumerate(timesteps):
        alpha_prod_t = sched.alphas_cumprod[t]
        alpha_prod_t_prev = (sched.alphas_cumprod[timesteps[i - 1]] if i > 0
                             else sched.final_alpha_cumprod)
        mu, mu_prev = alpha_prod_t ** 0.5, alpha_prod_t_prev ** 0.5
        sigma, sigma_prev = (1 - alpha_prod_t) ** 0.5, (1 - alpha_prod_t_prev) ** 0.5
        eps = pipe.unet(latent, t, encoder_hidden_states=cond.repeat(latent.shape[0], 1, 1)).sample
        pred_x0 = (latent - sigma_prev * eps) / mu_prev
        latent = mu * pred_x0 + sigma * eps
        saved[int(t)] = latent
    return z0, saved


class State:
    """What register_time / init_pnp set on the modules: the current t and the schedules."""
    t = None
    qk_injection_timesteps = ()
    conv_injection_timesteps = ()


def _inject(schedule, t):
    return schedule is not None and (t in schedule or t == 1000)


class PnPSelfAttention:
    """register_attention_control_efficient's sa_forward as a diffusers attention processor."""

    def __init__(self, state):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        x = hidden_states
        assert encoder_hidden_states is None                      # attn1: self-attention
        q, k = attn.to_q(x), attn.to_k(x)
        if _inject(self.state.qk_injection_timesteps, self.state.t):
            n = q.shape[0] // 3
            q[n:2 * n] = q[:n]                                    # inject unconditional
            k[n:2 * n] = k[:n]
            q[2 * n:] = q[:n]                                     # inject conditional
            k[2 * n:] = k[:n]
        q, k = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k)
        v = attn.head_to_batch_dim(attn.to_v(x))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * attn.scale
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        return attn.to_out[0](attn.batch_to_head_dim(out))


@contextlib.contextmanager
def registered(unet, state):
    """The official registration: the 8 decoder attn1 layers and the conv hook; undone after."""
    saved = dict(unet.attn_processors)
    procs = dict(saved)
    for res, blocks in ATTN_LAYERS.items():
        for b in blocks:
            procs[f"up_blocks.{res}.attentions.{b}.transformer_blocks.0.attn1.processor"] = \
                PnPSelfAttention(state)
    unet.set_attn_processor(procs)

    def conv_hook(module, inputs, hidden_states):         # the branch right after conv2
        if _inject(state.conv_injection_timesteps, state.t):
            n = hidden_states.shape[0] // 3
            hidden_states[n:2 * n] = hidden_states[:n]
            hidden_states[2 * n:] = hidden_states[:n]
        return hidden_states

    handle = unet.up_blocks[1].resnets[1].conv2.register_forward_hook(conv_hook)
    try:
        yield
    finally:
        handle.remove()
        unet.set_attn_processor(saved)


@torch.no_grad()
def edit(pipe, saved, prompt, negative_prompt, steps, guidance=7.5, pnp_f_t=0.8, pnp_attn_t=0.5):
    """PNP.run_pnp / sample_loop / denoise_step. Returns (target z_0, source reconstruction)."""
    sched = scheduler_for(pipe, steps)
    state = State()
    pnp_f = int(steps * pnp_f_t)
    pnp_attn = int(steps * pnp_attn_t)
    state.qk_injection_timesteps = sched.timesteps[:pnp_attn] if pnp_attn >= 0 else []
    state.conv_injection_timesteps = sched.timesteps[:pnp_f] if pnp_f >= 0 else []
    embeds = torch.cat([text_embeds(pipe, [""]), text_embeds(pipe, [negative_prompt]),
                        text_embeds(pipe, [prompt])])         # [pnp_guidance_embeds, text_embeds]
    x = saved[int(sched.timesteps[0])]
    with registered(pipe.unet, state):
        for t in sched.timesteps:
            source = saved[int(t)]
            state.t = t.item()                                    # register_time
            eps = pipe.unet(torch.cat([source, x, x]), t, encoder_hidden_states=embeds).sample
            eps_src, eps_u, eps_c = eps.chunk(3)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            recon = sched.step(eps_src, t, source).prev_sample   # not official: kept to compare
    return x, recon
