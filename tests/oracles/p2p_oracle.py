"""Test-only oracle: the official Prompt-to-Prompt controllers, re-written independently.

This is a second, separate reading of google/prompt-to-prompt (`prompt-to-prompt_stable.ipynb`:
AttentionControl / AttentionStore / AttentionControlEdit / AttentionReplace / AttentionRefine /
AttentionReweight / LocalBlend; `null_text_w_ptp.ipynb`: LocalBlend's start and subtracted words;
`ptp_utils.py`: diffusion_step; the word handling is in p2p_oracle_words.py) and of its diffusers port
(`examples/community/pipeline_prompt2prompt.py`: attention processors). It shares no code with
minip2p: it runs on diffusers' UNet, transformers' CLIP tokenizer and diffusers' DDIMScheduler,
and keeps the official *mechanics* on purpose, because they are what minip2p claims to be
equivalent to:

* the controller learns where it is only by counting calls (a layer counter that wraps after
  `num_att_layers` calls and then advances the step and runs `between_steps`);
* it sees the probabilities with heads folded into the batch, (2B·heads, pixels, tokens), and
  edits only the conditional half, in place;
* the store appends the very tensor that the edit then overwrites in place, so it keeps the
  *edited* maps (aliasing), sums steps in place, and LocalBlend reads that running sum;
* `step_callback` runs after every scheduler step.

Deliberate departures from the official code, each the documented intent (P2P_REFERENCE.md):
* word swap: after the last swapped word the official mapper writes `mapper[j, j]`; here
  `mapper[i, j]` (source token i feeds target token j), which matters when a swap changes the
  token count;
* LocalBlend works for any number of prompts: mask_b = mask_source OR mask_b, the way the
  null-text notebook writes it (`mask[:1] + mask`); the stable notebook's `mask[:1] + mask[1:]`
  only broadcasts for 2 prompts;
* re-weighting takes one factor row per edited prompt, each word looked up in its own prompt
  (the notebook's `get_equalizer` looks words up in prompts[1] and shares that row among the
  edited prompts: the same thing for 2 prompts);
* the resolution constants are parameters. The official values are for 512 px (latents 64²):
  store maps with ≤ 32² pixels, replace self-attention at ≤ 16² pixels, LocalBlend on the
  16×16 maps (2 down + 3 up layers). At another latent size (h, w) the same layers are those
  with ≤ (h/2)(w/2), ≤ (h/4)(w/4) pixels and maps of (h/4) × (w/4): `resolution_constants`.
"""
from __future__ import annotations

import abc
import contextlib

import torch
import torch.nn.functional as F

from oracles.p2p_oracle_words import (N_TOKENS, make_equalizer, refine_mapper,  # noqa: F401
                                      swap_mapper, time_word_alpha, word_token_positions)


def resolution_constants(latent_h: int, latent_w: int) -> dict:
    """The official 512-px constants moved to latents (latent_h, latent_w): SD 1.x halves the
    resolution per level, so "32²" is the second level, "16²" the third (of latents 64²)."""
    return dict(store_max_pixels=(latent_h // 2) * (latent_w // 2),
                self_max_pixels=(latent_h // 4) * (latent_w // 4),
                blend_map=(latent_h // 4, latent_w // 4))


# ------------------------------------------------------------------------------ controllers

class AttentionControl(abc.ABC):
    """Counts attention calls to know the layer and the step; edits the conditional half."""

    def __init__(self):
        self.cur_step, self.cur_att_layer, self.num_att_layers = 0, 0, -1

    def step_callback(self, x_t):
        return x_t

    def between_steps(self):
        pass

    @abc.abstractmethod
    def forward(self, attn, is_cross: bool, place_in_unet: str):
        ...

    def __call__(self, attn, is_cross: bool, place_in_unet: str):
        half = attn.shape[0] // 2                                 # rows: [uncond×B·h, cond×B·h]
        attn[half:] = self.forward(attn[half:], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn


class AttentionStore(AttentionControl):
    """Keeps (a reference to) every map with ≤ max_pixels query pixels, summed over steps."""

    def __init__(self, max_pixels: int = 32 ** 2):
        super().__init__()
        self.max_pixels = max_pixels
        self.step_store, self.attention_store = self.empty(), {}

    @staticmethod
    def empty():
        return {f"{p}_{k}": [] for k in ("cross", "self") for p in ("down", "mid", "up")}

    def forward(self, attn, is_cross, place_in_unet):
        if attn.shape[1] <= self.max_pixels:
            self.step_store[f"{place_in_unet}_{'cross' if is_cross else 'self'}"].append(attn)
        return attn

    def between_steps(self):
        if not self.attention_store:
            self.attention_store = self.step_store                 # aliases this step's maps
        else:
            for key, maps in self.attention_store.items():
                for n in range(len(maps)):
                    maps[n] += self.step_store[key][n]             # in place
        self.step_store = self.empty()

    def get_average_attention(self):
        return {k: [m / self.cur_step for m in v] for k, v in self.attention_store.items()}


class LocalBlend:
    """After each step (once `start` of the steps have passed): blend the edited latents into
    the source's outside the mask of the chosen words (stable + null-text notebooks)."""

    def __init__(self, tokenizer, prompts, words, steps: int, map_hw=(16, 16), threshold=0.3,
                 start=0.0, subtract=None, subtract_threshold=0.3):
        self.alpha = self._layers(tokenizer, prompts, words)
        self.sub = self._layers(tokenizer, prompts, subtract) if subtract is not None else None
        self.map_hw, self.th = map_hw, (threshold, subtract_threshold)
        self.start_blend, self.counter = int(start * steps), 0

    @staticmethod
    def _layers(tokenizer, prompts, words):
        layers = torch.zeros(len(prompts), 1, 1, 1, 1, N_TOKENS)
        for b, (prompt, ws) in enumerate(zip(prompts, words)):
            for w in [ws] if isinstance(ws, (str, int)) else ws:
                layers[b, :, :, :, :, word_token_positions(tokenizer, prompt, w)] = 1
        return layers

    def _mask(self, x_t, maps, alpha, use_pool):
        maps = (maps * alpha).sum(-1).mean(1)                      # (B, 1, h, w)
        if use_pool:
            maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(maps, size=x_t.shape[2:])
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(self.th[0 if use_pool else 1])
        return mask[:1] + mask                                     # source OR own, any B

    def __call__(self, x_t, attention_store):
        self.counter += 1
        if self.counter <= self.start_blend:
            return x_t
        B = self.alpha.shape[0]
        # the two down and three up layers at the blend resolution: with the store limited to
        # "32²" these are the last two stored down maps and the first three stored up maps
        maps = attention_store["down_cross"][2:4] + attention_store["up_cross"][:3]
        maps = torch.cat([m.reshape(B, -1, 1, *self.map_hw, N_TOKENS) for m in maps], dim=1)
        mask = self._mask(x_t, maps, self.alpha, True)
        if self.sub is not None:
            mask = mask * ~self._mask(x_t, maps, self.sub, False)
        mask = mask.float()
        return x_t[:1] + mask * (x_t - x_t[:1])


class AttentionControlEdit(AttentionStore):
    def __init__(self, tokenizer, prompts, steps, cross_replace_steps, self_replace_steps,
                 local_blend=None, store_max_pixels=32 ** 2, self_max_pixels=16 ** 2):
        super().__init__(store_max_pixels)
        self.batch_size = len(prompts)
        self.cross_replace_window = time_word_alpha(tokenizer, prompts, steps, cross_replace_steps)
        lo, hi = (0.0, self_replace_steps) if isinstance(self_replace_steps, (int, float)) \
            else self_replace_steps
        self.num_self_replace = int(steps * lo), int(steps * hi)
        self.local_blend, self.self_max_pixels = local_blend, self_max_pixels

    def step_callback(self, x_t):
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replace_self_attention(self, attn_base, att_replace):
        if att_replace.shape[2] <= self.self_max_pixels:
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base, att_replace):
        ...

    def forward(self, attn, is_cross, place_in_unet):
        super().forward(attn, is_cross, place_in_unet)           # stored, then edited in place
        if is_cross or self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]:
            heads = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, heads, *attn.shape[1:])
            base, rest = attn[0], attn[1:]
            if is_cross:
                a = self.cross_replace_window[self.cur_step]
                attn[1:] = self.replace_cross_attention(base, rest) * a + (1 - a) * rest
            else:
                attn[1:] = self.replace_self_attention(base, rest)
            attn = attn.reshape(self.batch_size * heads, *attn.shape[2:])
        return attn


class AttentionReplace(AttentionControlEdit):
    def __init__(self, tokenizer, prompts, steps, cross_replace_steps, self_replace_steps, **kw):
        super().__init__(tokenizer, prompts, steps, cross_replace_steps, self_replace_steps, **kw)
        self.mapper = torch.stack([swap_mapper(tokenizer, prompts[0], p) for p in prompts[1:]])

    def replace_cross_attention(self, attn_base, att_replace):
        return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)


class AttentionRefine(AttentionControlEdit):
    def __init__(self, tokenizer, prompts, steps, cross_replace_steps, self_replace_steps, **kw):
        super().__init__(tokenizer, prompts, steps, cross_replace_steps, self_replace_steps, **kw)
        pairs = [refine_mapper(tokenizer, prompts[0], p) for p in prompts[1:]]
        self.mapper = torch.stack([m for m, _ in pairs])
        self.alphas = torch.stack([a for _, a in pairs])[:, None, None, :]

    def replace_cross_attention(self, attn_base, att_replace):
        taken = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        return taken * self.alphas + att_replace * (1 - self.alphas)


class AttentionReweight(AttentionControlEdit):
    def __init__(self, tokenizer, prompts, steps, cross_replace_steps, self_replace_steps,
                 equalizer, controller=None, **kw):
        super().__init__(tokenizer, prompts, steps, cross_replace_steps, self_replace_steps, **kw)
        self.equalizer, self.prev_controller = equalizer, controller

    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev_controller is not None:
            attn_base = self.prev_controller.replace_cross_attention(attn_base, att_replace)
        else:
            attn_base = attn_base[None]
        return attn_base * self.equalizer[:, None, None, :]


# ------------------------------------------------------------------------------ diffusers hook

class P2PProcessor:
    """A diffusers attention processor that forms the probabilities explicitly and hands them
    to the controller (the one-line change of the diffusers port)."""

    def __init__(self, controller, place_in_unet):
        self.controller, self.place_in_unet = controller, place_in_unet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)             # (2B·heads, pixels, tokens)
        probs = self.controller(probs, is_cross, self.place_in_unet)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def controlled(unet, controller):
    """Route every attention layer of a diffusers UNet through `controller`; restore after."""
    saved = dict(unet.attn_processors)
    procs = {}
    for name in saved:
        place = next(p for p in ("down", "mid", "up") if name.startswith(p))
        procs[name] = P2PProcessor(controller, place)
    unet.set_attn_processor(dict(procs))
    controller.num_att_layers = len(procs)
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(saved))


@torch.no_grad()
def text2image(pipe, prompts, controller, steps=8, seed=0, guidance=7.5, height=64, width=64):
    """ptp_utils.text2image_ldm_stable on the diffusers components, with DDIM (null-text
    notebook's scheduler): one shared z_T, batch [uncond×B, cond×B], step_callback after each
    scheduler step. Returns (latents (B, 4, h, w), images (B, 3, H, W) in [0, 1])."""
    from diffusers import DDIMScheduler
    B = len(prompts)
    tok = pipe.tokenizer

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=N_TOKENS, truncation=True,
                  return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    context = torch.cat([encode([""] * B), encode(prompts)])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent = torch.randn((1, pipe.unet.config.in_channels, height // f, width // f),
                         generator=torch.Generator("cpu").manual_seed(seed))
    latents = latent.expand(B, *latent.shape[1:])
    with controlled(pipe.unet, controller):
        for t in scheduler.timesteps:
            eps = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
            latents = controller.step_callback(latents)
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents, (images / 2 + 0.5).clamp(0, 1)
