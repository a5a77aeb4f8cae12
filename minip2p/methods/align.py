"""Token alignment and time windows for Prompt-to-Prompt (Hertz et al. 2022).

An edit replaces the cross-attention maps M* of an edited prompt P* by a function of the source
prompt's maps M (shape batch x heads x pixels x 77 tokens). This module answers two questions:

* *which* source token feeds each target token -- the word-swap mapper (Replace, section 3.2)
  and the refinement alignment (Refine, "adding a new phrase");
* *when* the edit is active -- the cross-attention window tau (per step, optionally per word)
  and the self-attention window.

Conventions (shared with the attention code):
  word swap:  M*[..., n] = sum_w M[..., w] * mapper[w, n]   (mapper indexed [source, target])
  refine:     M*[..., n] = aligned[n] * M[..., mapper[n]] + (1 - aligned[n]) * M*[..., n]
  schedule:   M* <- tau[t, n] * Edit(M)[..., n] + (1 - tau[t, n]) * M*[..., n]
Token positions count the start token as 0. Words are split on single spaces, as the paper's code
does, so "burger," is a different word from "burger".
"""
import torch

from ..errors import MinipError
from ..model.tokenizer import END, LENGTH, START

_WINDOW_FORMS = ("expected a number (0.8), a start,end pair (0.2,0.8), or word=value items "
                 "(default=1.0,lion=0.4 or lion=0.2:0.6)")


# ---------------------------------------------------------------------------------- word swap

def replace_mapper(tok, source: str, target: str) -> torch.Tensor:
    """Word-swap mapper (Replace edit) from `source` to `target`: a (77, 77) float matrix.

    Unchanged tokens map one to one (a shifted diagonal once a swapped word changes the token
    count). A swapped word of k source tokens and m target tokens: if k == m its tokens pair up
    in order; otherwise every one of the m target tokens takes all k source tokens with weight
    1/m (as the official code does), so every source row still sums to 1 and the attention mass
    is kept, while each of those target columns sums to k/m.
    """
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        raise MinipError(f"word swap needs prompts with the same number of words, but {source!r} "
                         f"has {len(src_words)} and {target!r} has {len(tgt_words)}; "
                         f"use refine mode to add or remove words")
    mapper = torch.zeros(LENGTH, LENGTH)                          # [source token, target token]
    i = j = 0                                                     # next source / target position
    for w in range(len(src_words)):
        if src_words[w] == tgt_words[w]:
            continue
        src = [p for p in tok.word_positions(source, w) if p < LENGTH]   # k positions
        tgt = [p for p in tok.word_positions(target, w) if p < LENGTH]   # m positions
        if not src or not tgt:
            raise MinipError(f"word swap: swapped word {src_words[w]!r} -> {tgt_words[w]!r} has "
                             f"no tokens inside the {LENGTH}-token window; shorten the prompts")
        while i < src[0] and j < LENGTH:                          # unchanged tokens before it
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
        if len(src) == len(tgt):
            mapper[src, tgt] = 1.0                                # pairs (src[q], tgt[q])
        else:
            for t in tgt:
                mapper[src, t] = 1.0 / len(tgt)
        i, j = i + len(src), j + len(tgt)
    while i < LENGTH and j < LENGTH:
        # Tokens after the last swapped word, end token and padding included. The official code
        # writes mapper[j, j] here, which maps the wrong source token whenever the swap changed
        # the token count (i != j); we map i -> j. If the source is longer, the last target
        # padding columns get nothing, as in the official code.
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    return mapper


def replace_mappers(tok, prompts: list[str]) -> torch.Tensor:
    """Word-swap mappers from prompts[0] to each edited prompt: (B-1, 77, 77)."""
    return torch.stack([replace_mapper(tok, prompts[0], p) for p in prompts[1:]])


# ---------------------------------------------------------------------------------- refinement

def _token_ids(tok, text: str) -> list[int]:
    """The prompt's real tokens: start, BPE ids (cut to fit 77), end -- no padding."""
    return [START] + tok.tokenize(text)[: LENGTH - 2] + [END]


def _global_align(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch global alignment of token sequences x (source) and y (target).

    Scores: match +1, mismatch -1, gap 0. On ties the traceback prefers an insertion (a target
    token with no source, "left"), then a deletion (a dropped source token, "up"), then the
    diagonal, exactly like the official `global_align`. Returns, for every position of y, the
    aligned position of x, or -1 for a new token.
    """
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]      # (|x|+1, |y|+1); borders 0
    move = [["up"] * (len(y) + 1) for _ in range(len(x) + 1)]    # first column: deletions
    move[0] = ["left"] * (len(y) + 1)                              # first row: insertions
    for a in range(1, len(x) + 1):
        for b in range(1, len(y) + 1):
            left, up = score[a][b - 1], score[a - 1][b]           # gap costs 0
            diag = score[a - 1][b - 1] + (1 if x[a - 1] == y[b - 1] else -1)
            score[a][b] = best = max(left, up, diag)
            move[a][b] = "left" if best == left else "up" if best == up else "diag"
    source_of = [-1] * len(y)
    a, b = len(x), len(y)
    while a > 0 or b > 0:
        step = move[a][b]
        if step == "diag":
            a, b = a - 1, b - 1
            source_of[b] = a
        elif step == "left":
            b -= 1                                                # new target token: stays -1
        else:
            a -= 1                                                # source token dropped
    return source_of


def refine_mapper(tok, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement alignment (Refine edit, "adding a new phrase") of `target` against `source`.

    Returns mapper (77,) long and aligned (77,) float. For a target token n aligned to a source
    token, mapper[n] is that source position and aligned[n] = 1; for a new token mapper[n] = -1
    (harmless: aligned[n] = 0, so M*[..., n] keeps its own attention; -1 is the official value
    and indexes the last column). Padding after the target's end token maps n -> n, aligned 1,
    as in the official code.
    """
    y = _token_ids(tok, target)
    source_of = _global_align(_token_ids(tok, source), y)
    mapper = torch.arange(LENGTH)                                 # padding: n -> n
    mapper[: len(y)] = torch.tensor(source_of)
    aligned = torch.ones(LENGTH)
    aligned[: len(y)] = (mapper[: len(y)] >= 0).float()
    return mapper, aligned


def refine_mappers(tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement mappers (B-1, 77) and aligned masks (B-1, 77) from prompts[0] to each edit."""
    pairs = [refine_mapper(tok, prompts[0], p) for p in prompts[1:]]
    return torch.stack([m for m, _ in pairs]), torch.stack([a for _, a in pairs])


# ---------------------------------------------------------------------------------- schedules

def _bounds(window, what: str = "window") -> tuple[float, float]:
    """A window as (start, end) fractions of the run: s -> (0, s); checks 0 <= start <= end <= 1."""
    if isinstance(window, (int, float)) and not isinstance(window, bool):
        start, end = 0.0, float(window)
    elif isinstance(window, (tuple, list)) and len(window) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in window):
        start, end = float(window[0]), float(window[1])
    else:
        raise MinipError(f"{what} {window!r} is not a fraction s or a (start, end) pair")
    if not 0.0 <= start <= end <= 1.0:
        raise MinipError(f"{what} {window!r} must satisfy 0 <= start <= end <= 1")
    return start, end


def cross_replace_window(tok, prompts: list[str], steps: int, window) -> torch.Tensor:
    """Cross-attention replacement window τ (per step and token): (steps+1, B-1, 77) of 0/1.

    `window` is s (-> (0, s)), (start, end), or {"default_": s, "word": s_word or (a, b), ...}.
    A window (a, b) sets rows int(a*(N+1)) <= i < int(b*(N+1)) to 1 and the others to 0; N+1
    rows as in the official `get_time_words_attention_alpha`. The default window covers every
    token (start, end and padding too) of every edited prompt and is (0, 1) if the dict has none;
    a word's window then overrides the tokens of every occurrence of that word in each edited
    prompt that contains it (words in dict order). A word found in no edited prompt is an error.
    """
    windows = dict(window) if isinstance(window, dict) else {"default_": window}
    default = _bounds(windows.pop("default_", (0.0, 1.0)), "cross-attention window")

    def rows(a: float, b: float) -> slice:
        return slice(int(a * (steps + 1)), int(b * (steps + 1)))

    tau = torch.zeros(steps + 1, len(prompts) - 1, LENGTH)       # (steps+1, B-1, 77)
    tau[rows(*default)] = 1.0
    for word, value in windows.items():
        a, b = _bounds(value, f"cross-attention window for {word!r}")
        found = False
        for p, prompt in enumerate(prompts[1:]):
            if word not in prompt.split(" "):
                continue
            found = True
            positions = [n for n in tok.word_positions(prompt, word) if n < LENGTH]
            tau[:, p, positions] = 0.0
            tau[rows(a, b), p, positions] = 1.0
        if not found:
            raise MinipError(f"cross-attention window names the word {word!r}, which is not a "
                             f"word of the edited prompt(s) {' / '.join(map(repr, prompts[1:]))}")
    return tau


def self_replace_range(steps: int, window) -> tuple[int, int]:
    """Self-attention replacement steps: the edit applies when start <= step < end (0-based).

    `window` is s (-> (0, s)) or (a, b); start, end = int(N*a), int(N*b) as in the official code.
    """
    a, b = _bounds(window, "self-attention window")
    return int(steps * a), int(steps * b)


def parse_window(text: str):
    """Parse a window from the command line.

    "0.8" -> 0.8;  "0.2,0.8" -> (0.2, 0.8);  "default=1.0,lion=0.4" -> {"default_": 1.0,
    "lion": 0.4};  "lion=0.2:0.6" -> {"lion": (0.2, 0.6)}. Values are checked like any window.
    """
    def number_or_pair(part: str, sep: str):
        values = tuple(float(v) for v in part.split(sep))
        if len(values) > 2:
            raise ValueError(part)
        return values[0] if len(values) == 1 else values

    text = text.strip()
    try:
        if "=" not in text:
            return _checked(number_or_pair(text, ","), text)
        out = {}
        for item in text.split(","):
            word, value = (s.strip() for s in item.split("="))   # ValueError unless one "="
            key = "default_" if word in ("default", "default_") else word
            if not word or key in out:
                raise ValueError(item)
            out[key] = _checked(number_or_pair(value, ":"), text)
        return out
    except ValueError:
        raise MinipError(f"could not read window {text!r}: {_WINDOW_FORMS}") from None


def _checked(value, text: str):
    """`value` if it is a valid window, else a one-line MinipError quoting the user's text."""
    _bounds(value, f"window {text!r}:")
    return value


def check_window(name: str, window) -> None:
    """A window parameter (s, (start, end), or {"default_": s, word: s or (a, b)}), else one
    ParameterError line naming it."""
    from .base import ParameterError
    for value in (window.values() if isinstance(window, dict) else [window]):
        try:
            _bounds(value)
        except MinipError:
            raise ParameterError(name, f"{window!r} is not a fraction s or a (start, end) pair "
                                       "with 0 <= start <= end <= 1") from None
