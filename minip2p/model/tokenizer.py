"""CLIP's byte-level BPE tokenizer, as Stable Diffusion 1.x uses it.

Text goes through four steps, all run by the `tokenizers` library:

1. clean-up: Unicode NFC, every run of whitespace becomes one space, lower-case. This is exactly
   what transformers' `CLIPTokenizer` does (the one the real SD pipelines use; transformers >= 5
   has no ftfy / html-unescape / CJK-splitting "slow" path any more);
2. split into pieces with CLIP's pattern: the two special-token strings, the English contractions
   ('s 't 're 've 'm 'll 'd), runs of letters, single digits, runs of other non-space symbols;
   whitespace itself is dropped;
3. map each piece's UTF-8 bytes to printable characters (GPT-2's byte-level trick);
4. byte-pair-encode each piece, whose last symbol carries the end-of-word mark `</w>`.

A prompt is then framed as START, up to 75 ids, END, padded to 77 ids with the pad token: END for
SD 1.x, "!" (id 0) for SD 2.x, as the checkpoint's tokenizer config says. The literal strings
`<|startoftext|>` / `<|endoftext|>` typed into a prompt become the special ids, like transformers.

Textual-inversion tokens (`add_tokens`, see embeddings.py) are matched whole before the BPE, like
transformers' added tokens. A token with n > 1 vectors stands for n ids "<tok>" "<tok>_1" ...
"<tok>_{n-1}": the prompt text is expanded first, as diffusers' `maybe_convert_prompt` does.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import MinipError, ParameterError

START, END, LENGTH = 49406, 49407, 77  # <|startoftext|>, <|endoftext|>, ids per prompt
START_TEXT, END_TEXT = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
MAX_TOKENS = LENGTH - 2  # room left between START and END

# CLIP's splitting pattern. It is applied after lower-casing, so it need not ignore case itself.
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


def _short(text: str, limit: int = 60) -> str:
    """The text quoted on one line, cut to about `limit` characters, for messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MinipError(f"cannot read the CLIP vocabulary {path}: {err}") from None
    if not isinstance(vocab, dict) or vocab.get(START_TEXT) != START or vocab.get(END_TEXT) != END:
        raise MinipError(f"{path} is not CLIP's vocabulary (expected {START_TEXT}={START}, "
                         f"{END_TEXT}={END})")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MinipError(f"cannot read the CLIP merges {path}: {err}") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]  # header line, not a merge
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise MinipError(f"{path} line {number} is not a merge of two symbols: {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _pad_token(folder: Path) -> str:
    """The pad token named by a tokenizer folder's special_tokens_map.json / tokenizer_config.json
    (SD 2.x: "!"); END_TEXT when neither names one (SD 1.x, the shipped tables)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            pad = json.loads((folder / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str):
            return pad
    return END_TEXT


class ClipTokenizer:
    """Turns prompts into CLIP token ids (and back), plus the word-to-position map P2P needs."""

    def __init__(self, vocab_path=None, merges_path=None, *, vocab=None, merges=None,
                 pad: str = END_TEXT):
        """From the two files, or from the tables themselves (`vocab=`, `merges=`).
        `pad`: the padding token's text (END_TEXT for SD 1.x, "!" for SD 2.x)."""
        if vocab is None:
            vocab, merges = _read_vocab(Path(vocab_path)), _read_merges(Path(merges_path))
        if pad not in vocab:
            raise MinipError(f"the tokenizer's pad token {pad!r} is not in its vocabulary")
        self.pad = vocab[pad]
        self.strict = False  # True: a prompt longer than the window is an error, not a warning
        self.vectors: dict[str, int] = {}       # textual-inversion token -> number of vectors
        try:
            bpe = models.BPE(vocab, merges, continuing_subword_prefix="",
                             end_of_word_suffix=WORD_END, unk_token=END_TEXT)
        except Exception as err:  # the library names the merge whose symbols are not in vocab
            raise MinipError(f"the CLIP tokenizer files do not fit together: {err}") from None
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            # invert=True: the pattern says what to keep; the gaps (whitespace) are removed.
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            # use_regex stays on, as in transformers: it only matters for a lower-cased
            # "<|ENDOFTEXT|>" typed in a prompt, which it breaks into "<|", "endoftext", "|>".
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # transformers splits the text at every special token, the pad token included: with SD
        # 2.x's "!" as pad, a typed "!" becomes id 0 (not "!</w>"), and so it does here
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys((START_TEXT, END_TEXT, pad))])
        self._tok = tok

    @classmethod
    def from_dir(cls, folder) -> "ClipTokenizer":
        """Load from a folder holding `vocab.json` and `merges.txt` (a checkpoint's `tokenizer/`),
        or only a `tokenizer.json` (what transformers >= 5 saves): its BPE tables are used."""
        folder = Path(folder)
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder / "tokenizer.json")
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise MinipError(f"no {name} in {folder}; a CLIP tokenizer folder holds "
                                 f"vocab.json and merges.txt")
        return cls(folder / "vocab.json", folder / "merges.txt", pad=_pad_token(folder))

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> "ClipTokenizer":
        try:
            bpe = json.loads(path.read_text(encoding="utf-8"))["model"]
            vocab = bpe["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise MinipError(f"cannot read the CLIP tokenizer {path}: {err!r}") from None
        if vocab.get(START_TEXT) != START or vocab.get(END_TEXT) != END:
            raise MinipError(f"{path} is not CLIP's tokenizer (expected {START_TEXT}={START})")
        return cls(vocab=vocab, merges=merges, pad=_pad_token(path.parent))

    # ---- added tokens (textual inversion) ---------------------------------------------------

    def add_tokens(self, token: str, n: int) -> list[int]:
        """Add `token` standing for `n` vectors (ids "<tok>", "<tok>_1", ...); returns their ids.
        A name the vocabulary already knows (as a piece or a word) is refused."""
        names = [token] + [f"{token}_{i}" for i in range(1, n)]
        for name in names:
            if not name.strip() or self.knows(name):
                raise MinipError(f"token {name!r} already exists in the tokenizer's vocabulary; "
                                 "rename the embedding (a new, unused word such as <my-token>)")
        self._tok.add_tokens([AddedToken(name, normalized=True, special=False) for name in names])
        self.vectors[token] = n
        return [self._tok.token_to_id(name) for name in names]

    def knows(self, name: str) -> bool:
        """Is `name` already in the vocabulary (as a piece, a word or an added token)?"""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return name in vocab or name + WORD_END in vocab

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def expand(self, text: str) -> str:
        """Write each multi-vector token out as its n names (diffusers' maybe_convert_prompt)."""
        for token, n in self.vectors.items():
            if n > 1 and token in text:
                text = text.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, n)]))
        return text

    # ---- text -> ids ------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """All BPE ids of `text`: no START/END, no truncation."""
        return self._tok.encode(self.expand(text), add_special_tokens=False).ids

    def encode(self, text: str) -> tuple[list[int], int]:
        """The 77 ids SD's text encoder reads, and how many tokens did not fit (0 if all did)."""
        ids = self.tokenize(text)
        dropped = max(0, len(ids) - MAX_TOKENS)
        ids = [START] + ids[:MAX_TOKENS] + [END]
        return ids + [self.pad] * (LENGTH - len(ids)), dropped

    def __call__(self, texts: list[str]) -> torch.LongTensor:
        """A (batch, 77) tensor of ids; warns about each prompt that had to be cut (refuses it
        where `strict` is set, e.g. by load_model's `strict_length`)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids, dropped = self.encode(text)
            if dropped and self.strict:
                raise ParameterError("prompts", f"prompt {_short(text)} is {dropped} tokens too "
                                     f"long: the text encoder reads at most {MAX_TOKENS} (77 with "
                                     "start and end); shorten it")
            if dropped:
                warnings.warn(f"prompt {_short(text)} is {dropped} tokens too long; "
                              f"the last {dropped} were dropped", stacklevel=2)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), LENGTH)

    # ---- ids -> text ------------------------------------------------------------------------

    def decode(self, ids) -> str:
        """The text of `ids`, START/END (and so END padding) left out; word ends become spaces."""
        ids = [int(i) for i in ids if int(i) not in (START, END)]
        return self._tok.decode(ids, skip_special_tokens=False).replace(WORD_END, " ").strip()

    def token_strings(self, prompt: str) -> list[str]:
        """One readable label per position 0..76 of the encoded prompt, e.g. for captions.

        A token holding only part of a multi-byte character (emoji, CJK) shows as "\ufffd".
        """
        labels = {START: "<start>", END: "<end>"}
        return [labels.get(i) or self.decode([i]) for i in self.encode(prompt)[0]]

    # ---- words -> positions -----------------------------------------------------------------

    def word_positions(self, prompt: str, word: str | int) -> list[int]:
        """Positions (in the 77 encoded ids) of the tokens of `word`, Prompt-to-Prompt style.

        The prompt is split on single spaces into words. `word` is either a string, meaning
        every word exactly equal to it (so "burger" does not match "burger,"), or an int, a word
        index. Position 0 is START, so the first word's first token sits at position 1. Tokens
        cut off by the 75-token limit have no position and are left out.
        """
        words = prompt.split(" ")
        if isinstance(word, int):
            if not 0 <= word < len(words):
                raise MinipError(f"word index {word} is out of range: the prompt {_short(prompt)} "
                                 f"has {len(words)} words")
            chosen = {word}
        else:
            chosen = {i for i, w in enumerate(words) if w == word}
            if not chosen:
                listed = ", ".join(repr(w) for w in words)
                raise MinipError(f"word {word!r} is not in the prompt {_short(prompt)}; "
                                 f"words are: {listed}")
        # Whitespace never sits inside a token, so tokenizing word by word counts each word's
        # tokens exactly as tokenizing the whole prompt does.
        positions, next_position = [], 1
        for i, w in enumerate(words):
            count = len(self.tokenize(w))
            if i in chosen:
                positions += range(next_position, next_position + count)
            next_position += count
        return [p for p in positions if p <= MAX_TOKENS]
