"""Test-only oracle: the official MasaCtrl, re-written independently on diffusers' UNet.

A second reading of TencentARC/MasaCtrl (`masactrl/masactrl_utils.py`: AttentionBase and
`regiter_attention_editor_diffusers`; `masactrl/masactrl.py`: MutualSelfAttentionControl and
MutualSelfAttentionControlMaskAuto; `masactrl/diffuser_utils.py`: MasaCtrlPipeline.__call__,
step, invert, next_step). It shares no code with minip2p and keeps the official mechanics on
purpose:

* the editor learns where it is by counting calls: `cur_att_layer` over all attention calls
  (attn1, attn2 of each transformer block: 32 per step at SD 1.x), the layer is
  `cur_att_layer // 2`, the step advances when the counter wraps;
* q, k, v arrive with heads folded into the batch, (2B·heads, n, d); a half's queries are laid
  side by side, "h (b n) d", and attend to the keys of the half's first image;
* the automatic mask keeps the head-averaged cross maps of the 16² layers of the current step in
  a list that `after_step` clears;
* the sampler is the official DDIM step (`prev_timestep > 0` else the final ᾱ) with shared
  initial noise, CFG over [uncond × B, cond × B] and, for real images, the source latent
  replaced before each step by `ref_intermediate_latents[-1 - i]`.

Departure, documented: the 16² of the mask maps is a parameter (`map_pixels`; the official value
is for 512 px), and the mask-guided target is the last image, as the official code (B = 2).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange


class EditorBase:
    """AttentionBase: plain attention, with the call counter."""

    def __init__(self):
        self.cur_step, self.cur_att_layer, self.num_att_layers = 0, 0, -1

    def after_step(self):
        pass

    def __call__(self, q, k, v, sim, attn, is_cross, place, heads, **kw):
        out = self.forward(q, k, v, sim, attn, is_cross, place, heads, **kw)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer, self.cur_step = 0, self.cur_step + 1
            self.after_step()
        return out

    def forward(self, q, k, v, sim, attn, is_cross, place, heads, **kw):
        return rearrange(torch.einsum("bij,bjd->bid", attn, v), "(b h) n d -> b n (h d)", h=heads)


class Mutual(EditorBase):
    """MutualSelfAttentionControl."""

    def __init__(self, start_step=4, start_layer=10, total_steps=50, total_layers=16):
        super().__init__()
        self.steps = list(range(start_step, total_steps))
        self.layers = list(range(start_layer, total_layers))

    def inactive(self, is_cross):
        return is_cross or self.cur_step not in self.steps or self.cur_att_layer // 2 not in self.layers

    def side_by_side(self, q, k, v, heads, scale, key_mask=None):
        """Every image's queries (b·heads rows) against the keys of one image (heads rows).
        key_mask (m,) 0/1: two outputs, foreground keys only then background keys only."""
        b = q.shape[0] // heads
        q, k, v = (rearrange(t, "(b h) n d -> h (b n) d", h=heads) for t in (q, k, v))
        sim = torch.einsum("hid,hjd->hij", q, k) * scale
        if key_mask is not None:
            low = torch.finfo(sim.dtype).min
            sim = torch.cat([sim + key_mask.masked_fill(key_mask == 0, low),
                             sim + key_mask.masked_fill(key_mask == 1, low)])
            v = torch.cat([v, v])
        out = torch.einsum("hij,hjd->hid", sim.softmax(-1), v)
        return rearrange(out, "(g h) (b n) d -> (g b) n (h d)", b=b, h=heads)

    def forward(self, q, k, v, sim, attn, is_cross, place, heads, **kw):
        if self.inactive(is_cross):
            return super().forward(q, k, v, sim, attn, is_cross, place, heads, **kw)
        outs = []
        for qh, kh, vh in zip(q.chunk(2), k.chunk(2), v.chunk(2)):            # uncond, cond
            outs.append(self.side_by_side(qh, kh[:heads], vh[:heads], heads, kw["scale"]))
        return torch.cat(outs)


class MutualMaskAuto(Mutual):
    """MutualSelfAttentionControlMaskAuto for a pair (source, target)."""

    def __init__(self, start_step=4, start_layer=10, total_steps=50, thres=0.1,
                 ref_token_idx=(1,), cur_token_idx=(1,), map_pixels=16 * 16, total_layers=16):
        super().__init__(start_step, start_layer, total_steps, total_layers)
        self.thres, self.map_pixels = thres, map_pixels
        self.ref_idx, self.cur_idx = list(ref_token_idx), list(cur_token_idx)
        self.cross_attns = []
        self.seen_masks = []                      # (source key mask, target query mask) used

    def after_step(self):
        self.cross_attns = []

    def aggregate(self, idx):
        maps = torch.stack(self.cross_attns, dim=1).mean(1)                    # (2B, p, 77)
        res = int(maps.shape[1] ** 0.5)
        img = maps.reshape(-1, res, res, maps.shape[-1])[..., idx].sum(-1)     # (2B, res, res)
        lo = img.min(dim=1, keepdim=True)[0].min(dim=2, keepdim=True)[0]
        hi = img.max(dim=1, keepdim=True)[0].max(dim=2, keepdim=True)[0]
        return (img - lo) / (hi - lo)

    def forward(self, q, k, v, sim, attn, is_cross, place, heads, **kw):
        if is_cross and attn.shape[1] == self.map_pixels:
            self.cross_attns.append(attn.reshape(-1, heads, *attn.shape[-2:]).mean(1))
        if self.inactive(is_cross):
            return EditorBase.forward(self, q, k, v, sim, attn, is_cross, place, heads, **kw)
        res, scale = int(q.shape[1] ** 0.5), kw["scale"]
        halves = [t.chunk(2) for t in (q, k, v)]
        sources, targets = [], []
        for (qh, kh, vh) in zip(*halves):
            sources.append(self.side_by_side(qh[:heads], kh[:heads], vh[:heads], heads, scale))
        if not self.cross_attns:
            for (qh, kh, vh) in zip(*halves):
                targets.append(self.side_by_side(qh[-heads:], kh[:heads], vh[:heads], heads, scale))
            return torch.cat([sources[0], targets[0], sources[1], targets[1]])
        src_map = self.aggregate(self.ref_idx)[-2]                               # cond source
        key_mask = F.interpolate(src_map[None, None], (res, res)).flatten()
        key_mask = (key_mask >= self.thres).float()
        tgt_map = self.aggregate(self.cur_idx)[-1]                               # cond target
        query_mask = F.interpolate(tgt_map[None, None], (res, res)).reshape(-1, 1)
        query_mask = (query_mask >= self.thres).float()
        self.seen_masks.append((key_mask, query_mask))
        for (qh, kh, vh) in zip(*halves):
            fg, bg = self.side_by_side(qh[-heads:], kh[:heads], vh[:heads], heads, scale,
                                       key_mask).chunk(2)
            targets.append(fg * query_mask + bg * (1 - query_mask))
        return torch.cat([sources[0], targets[0], sources[1], targets[1]])


class EditorProcessor:
    """A diffusers attention processor doing what the official patched `forward` does."""

    def __init__(self, editor, place):
        self.editor, self.place = editor, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        h = attn.heads
        q, k, v = (rearrange(f(x), "b n (h d) -> (b h) n d", h=h)
                   for f, x in ((attn.to_q, hidden_states), (attn.to_k, context),
                                (attn.to_v, context)))
        sim = torch.einsum("bid,bjd->bij", q, k) * attn.scale
        out = self.editor(q, k, v, sim, sim.softmax(-1), is_cross, self.place, h, scale=attn.scale)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def registered(unet, editor):
    saved = dict(unet.attn_processors)
    procs = {n: EditorProcessor(editor, next(p for p in ("down", "mid", "up") if n.startswith(p)))
             for n in saved}
    editor.num_att_layers = len(procs)
    unet.set_attn_processor(dict(procs))              # (diffusers pops the dict it is given)
    try:
        yield editor
    finally:
        unet.set_attn_processor(dict(saved))


def _encode(pipe, texts):
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def _alpha(pipe, t):
    return pipe.scheduler.alphas_cumprod[t]


@torch.no_grad()
def sample(pipe, prompts, editor, steps, guidance, latents, ref_intermediate_latents=None):
    """MasaCtrlPipeline.__call__ (guidance > 1) with an editor registered; returns z_0."""
    B = len(prompts)
    context = torch.cat([_encode(pipe, [""] * B), _encode(pipe, prompts)])
    pipe.scheduler.set_timesteps(steps)
    ratio = pipe.scheduler.config.num_train_timesteps // steps
    final = pipe.scheduler.final_alpha_cumprod
    with registered(pipe.unet, editor):
        for i, t in enumerate(pipe.scheduler.timesteps):
            if ref_intermediate_latents is not None:
                latents = torch.cat([ref_intermediate_latents[-1 - i], latents.chunk(2)[1]])
            eps = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            prev = t - ratio                                           # the official `step`
            a_t, a_prev = _alpha(pipe, t), (_alpha(pipe, prev) if prev > 0 else final)
            x0 = (latents - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            latents = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return latents


@torch.no_grad()
def invert(pipe, z0, prompt, steps):
    """MasaCtrlPipeline.invert with guidance 1: [z_0, …, z_T] by the official `next_step`."""
    context = _encode(pipe, [prompt])
    pipe.scheduler.set_timesteps(steps)
    ratio = pipe.scheduler.config.num_train_timesteps // steps
    latents, out = z0, [z0]
    for t in reversed(pipe.scheduler.timesteps):
        eps = pipe.unet(latents, t, encoder_hidden_states=context).sample
        cur = min(int(t) - ratio, 999)
        a_t = _alpha(pipe, cur) if cur >= 0 else pipe.scheduler.final_alpha_cumprod
        a_next = _alpha(pipe, t)
        x0 = (latents - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        latents = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
        out.append(latents)
    return out
