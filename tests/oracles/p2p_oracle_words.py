"""Test-only oracle, part of p2p_oracle.py: the official Prompt-to-Prompt word handling, re-written
independently (`ptp_utils.py`: get_word_inds, get_time_words_attention_alpha; `seq_aligner.py`:
the word-swap and refinement mappers; the notebook's get_equalizer). The deliberate departures
(word swap writes mapper[i, j]; one re-weighting row per edited prompt) are listed in
p2p_oracle.py's docstring.
"""
from __future__ import annotations

import torch

N_TOKENS = 77



def word_token_positions(tokenizer, text: str, word) -> list[int]:
    """Token positions (start token = 0) of `word` (a string: every equal word; an int: that
    word index), found like the official get_word_inds: walk the decoded tokens, adding up their
    characters until a word of the space-split prompt is complete."""
    words = text.split(" ")
    wanted = {word} if isinstance(word, int) else {n for n, w in enumerate(words) if w == word}
    pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
    out, chars, current = [], 0, 0
    for pos, piece in enumerate(pieces, start=1):
        if current in wanted:
            out.append(pos)
        chars += len(piece)
        if chars >= len(words[current]):
            current, chars = current + 1, 0
    return out


def swap_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(77, 77) word-swap mapper [source token, target token]; the tail is mapped i -> j."""
    src_words, tgt_words = source.split(" "), target.split(" ")
    assert len(src_words) == len(tgt_words), "word swap needs equal word counts"
    swapped = [n for n in range(len(tgt_words)) if src_words[n] != tgt_words[n]]
    src_pos = [word_token_positions(tokenizer, source, n) for n in swapped]
    tgt_pos = [word_token_positions(tokenizer, target, n) for n in swapped]
    m = torch.zeros(N_TOKENS, N_TOKENS)
    i = j = k = 0
    while i < N_TOKENS and j < N_TOKENS:
        if k < len(swapped) and src_pos[k][0] == i:
            s, t = src_pos[k], tgt_pos[k]
            if len(s) == len(t):
                m[s, t] = 1.0
            else:
                for col in t:
                    m[s, col] = 1.0 / len(t)
            i, j, k = i + len(s), j + len(t), k + 1
        else:                                  # unchanged token (official: m[j, j] after the
            m[i, j] = 1.0                      # last swap -- the documented bug, fixed here)
            i, j = i + 1, j + 1
    return m


def _needleman_wunsch(x: list[int], y: list[int]) -> list[int]:
    """For each token of y, the aligned index in x, or -1. Match +1, mismatch -1, gap 0; when
    scores tie the traceback prefers a gap in x ("left"), then a gap in y ("up"), then the
    diagonal -- the official `global_align` order."""
    rows, cols = len(x) + 1, len(y) + 1
    score = torch.zeros(rows, cols, dtype=torch.long).tolist()
    way = [["left"] * cols] + [["up"] + [None] * (cols - 1) for _ in range(rows - 1)]
    way[0][0] = "stop"
    for a in range(1, rows):
        for b in range(1, cols):
            options = {"left": score[a][b - 1], "up": score[a - 1][b],
                       "diag": score[a - 1][b - 1] + (1 if x[a - 1] == y[b - 1] else -1)}
            best = max(options.values())
            score[a][b] = best
            way[a][b] = next(k for k in ("left", "up", "diag") if options[k] == best)
    aligned = []
    a, b = len(x), len(y)
    while (a > 0 or b > 0) and way[a][b] != "stop":
        if way[a][b] == "diag":
            a, b = a - 1, b - 1
            aligned.append(a)
        elif way[a][b] == "left":
            b -= 1
            aligned.append(-1)
        else:
            a -= 1
    return aligned[::-1]


def refine_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(77,) long mapper and (77,) alphas of the refinement edit, as seq_aligner.get_mapper."""
    x, y = tokenizer.encode(source), tokenizer.encode(target)   # start … end, no padding
    aligned = torch.tensor(_needleman_wunsch(x, y))
    mapper = torch.arange(N_TOKENS)                   # padding: n -> n
    mapper[: len(y)] = aligned
    alphas = torch.ones(N_TOKENS)
    alphas[: len(y)] = (aligned != -1).float()
    return mapper, alphas


def time_word_alpha(tokenizer, prompts, steps: int, window) -> torch.Tensor:
    """(steps+1, B-1, 1, 1, 77) cross-attention schedule, as get_time_words_attention_alpha."""
    windows = dict(window) if isinstance(window, dict) else {"default_": window}
    windows.setdefault("default_", (0.0, 1.0))
    alpha = torch.zeros(steps + 1, len(prompts) - 1, N_TOKENS)

    def put(bounds, b, cols):
        lo, hi = (0.0, bounds) if isinstance(bounds, (int, float)) else bounds
        lo, hi = int(lo * alpha.shape[0]), int(hi * alpha.shape[0])
        alpha[:, b, cols] = 0.0
        alpha[lo:hi, b, cols] = 1.0

    for b in range(len(prompts) - 1):
        put(windows["default_"], b, list(range(N_TOKENS)))
    for word, bounds in windows.items():
        if word == "default_":
            continue
        for b, prompt in enumerate(prompts[1:]):
            cols = word_token_positions(tokenizer, prompt, word)
            if cols:
                put(bounds, b, cols)
    return alpha.reshape(steps + 1, len(prompts) - 1, 1, 1, N_TOKENS)


def make_equalizer(tokenizer, prompts, factors: dict) -> torch.Tensor:
    """(B-1, 77): 1, except c at the tokens of each chosen word of each edited prompt."""
    eq = torch.ones(len(prompts) - 1, N_TOKENS)
    for b, prompt in enumerate(prompts[1:]):
        for word, c in factors.items():
            eq[b, word_token_positions(tokenizer, prompt, word)] = c
    return eq
