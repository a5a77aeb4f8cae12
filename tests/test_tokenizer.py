"""minip2p.model.tokenizer against transformers' CLIPTokenizer built from the same two files."""
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from minip2p.errors import MinipError
from minip2p.model.tokenizer import END, LENGTH, START, ClipTokenizer

transformers = pytest.importorskip("transformers")

FILES = Path(__file__).resolve().parents[1] / "weights" / "clip-tokenizer"

PROMPTS = [
    "a photo of a cat riding a bicycle!",
    "a painting of a squirrel eating a burger",
    "A Photo Of A CAT, Riding A BiCyClE!!!",
    "hello... world?! (really) [yes] {no} <tag> #hash @at $100 100% 3.14 -5 a/b a\\b",
    "it's don't I'm you're we've they'll he'd IT'S DON'T rock'n'roll '' 's",
    "café naïve résumé Ærøskøbing straße ÉCOLE",
    "cafe\u0301 (combining accent, not yet NFC) vs caf\u00e9",
    "ΟΔΟΣ ΑΣ Σ σ İstanbul ǅ ﬁ",  # final sigma, dotted I, titlecase digraph, ligature
    "😀 🐿️ 👩‍👩‍👧 🇫🇷 ❤️ smile😀smile",
    "東京の夜景 中文字符 한국어 テスト",
    "Москва ночью, красная площадь",
    "مرحبا بالعالم עברית हिन्दी ไทย",
    "1234567890 2024-01-01 1st 2nd 0.5x 10k",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand  double   spaces",
    "\u00a0no-break\u00a0space \u200bzero width\u200b \u3000ideographic space",
    "control\x1cchars\x00here\x7f and \x07 bell",
    "&amp; &lt;b&gt; html entities stay as typed",
    "fullwidth ＡＢＣ １２３ ！",
    "a <|endoftext|> b <|startoftext|> c",
    "a <|ENDOFTEXT|> b <|StartOfText|> c",
    "",
    " ",
    "\n\t",
    "!!!",
    "a",
    "supercalifragilisticexpialidocious photorealistic octane-render 8k uhd",
]
LONG_PROMPTS = [
    " ".join(["a cat"] * 50),  # 100 tokens
    "a highly detailed photorealistic painting of " + ", ".join(["intricate"] * 80),
    "🐿️" * 40,  # byte tokens only
]


def random_prompts(n=150, seed=0):
    """Mixed-script gibberish: letters, digits, punctuation, whitespace, accents, emoji, CJK."""
    pieces = list("abcXYZ019 .,!?'-_/\t\n") + ["'s", "'ll", "  ", "é", "e\u0301", "ß", "ǅ",
               "Σ", "İ", "д", "中", "の", "😀", "\u200d", "\ufe0f", "\u00a0", "\x1c", "<|endoftext|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _oracles():
    """transformers' CLIP tokenizers; the fast one only where it is a different class (< 5.0).

    Built with from_pretrained(folder): in transformers 5, `CLIPTokenizer(vocab_file=...,
    merges_file=...)` silently ignores both files and builds a 3-token dummy vocabulary.
    """
    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not transformers.CLIPTokenizer:
        classes.append(fast)
    return [c.from_pretrained(str(FILES)) for c in classes]


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.from_dir(FILES)


@pytest.fixture(scope="module", params=range(len(_oracles())), ids=lambda i: f"oracle{i}")
def oracle(request):
    reference = _oracles()[request.param]
    assert len(reference) == 49408  # the real vocabulary, not a dummy
    return reference


def reference_ids(oracle, text):
    return oracle(text, padding="max_length", max_length=LENGTH, truncation=True).input_ids


def test_pinned_ids(tok):
    ids, dropped = tok.encode("a photo of a cat riding a bicycle!")
    body = [START, 320, 1125, 539, 320, 2368, 6765, 320, 11652, 256, END]
    assert ids == body + [END] * (LENGTH - len(body)) and dropped == 0
    assert tok.tokenize("a photo of a cat riding a bicycle!") == body[1:-1]


@pytest.mark.parametrize("text", PROMPTS + LONG_PROMPTS + random_prompts())
def test_ids_match_transformers(tok, oracle, text):
    ids, _ = tok.encode(text)
    assert len(ids) == LENGTH
    assert ids == reference_ids(oracle, text)
    assert tok.tokenize(text) == oracle(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", PROMPTS + LONG_PROMPTS)
def test_decode_matches_transformers(tok, oracle, text):
    ids = reference_ids(oracle, text)
    assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True)
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


@pytest.mark.parametrize("text", LONG_PROMPTS)
def test_long_prompts_report_dropped_tokens(tok, oracle, text):
    full = oracle(text, add_special_tokens=False).input_ids
    assert len(full) > 75
    ids, dropped = tok.encode(text)
    assert dropped == len(full) - 75
    assert ids == [START] + full[:75] + [END]


def test_call_batches_and_warns_once_per_long_prompt(tok):
    texts = ["a cat", LONG_PROMPTS[0], "a dog", LONG_PROMPTS[1]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = tok(texts)
    assert batch.shape == (4, LENGTH) and batch.dtype == torch.long
    assert batch.tolist() == [tok.encode(t)[0] for t in texts]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "is 25 tokens too long; the last 25 were dropped" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok(["a cat", ""]).shape == (2, LENGTH)  # nothing to warn about
    assert tok([]).shape == (0, LENGTH)


def test_token_strings(tok):
    labels = tok.token_strings("a painting of a squirrel eating a burger")
    assert len(labels) == LENGTH
    assert labels[:10] == ["<start>", "a", "painting", "of", "a", "squirrel", "eating", "a",
                           "burger", "<end>"]
    assert set(labels[9:]) == {"<end>"}
    assert "".join(tok.token_strings("photorealistic")[1:3]) == "photorealistic"


PROMPT = "a painting of a squirrel eating a burger"


def test_word_positions(tok):
    assert tok.word_positions(PROMPT, "squirrel") == [5]
    assert tok.word_positions(PROMPT, "a") == [1, 4, 7]  # every equal word
    assert tok.word_positions(PROMPT, 4) == [5]  # word index
    assert tok.word_positions(PROMPT, 0) == [1]
    # a word of several tokens maps to all of them
    prompt = "a photorealistic squirrel"
    assert len(tok.tokenize("photorealistic")) == 2
    assert tok.word_positions(prompt, "photorealistic") == [2, 3]
    assert tok.word_positions(prompt, "squirrel") == [4]
    # punctuation stays with its word, as in the official code: "burger," is not "burger"
    prompt = "a squirrel eating a burger, happily"
    assert tok.word_positions(prompt, "burger,") == [5, 6]
    assert tok.word_positions(prompt, "happily") == [7]
    with pytest.raises(MinipError):
        tok.word_positions(prompt, "burger")


def test_word_positions_agree_with_encoding(tok):
    """Walking the words must land on the same tokens as encoding the whole prompt."""
    for text in PROMPTS + LONG_PROMPTS + random_prompts(seed=1):
        ids = tok.encode(text)[0]
        words = text.split(" ")
        found = [p for i in range(len(words)) for p in tok.word_positions(text, i)]
        n = min(len(tok.tokenize(text)), 75)
        assert found == list(range(1, n + 1)), text
        assert END not in [ids[p] for p in found] or "<|endoftext|>" in text.lower()


def test_word_positions_drop_truncated_tokens(tok):
    prompt = " ".join(["cat"] * 80) + " dog"
    assert tok.word_positions(prompt, "dog") == []
    assert tok.word_positions(prompt, "cat") == list(range(1, 76))


def test_word_positions_errors(tok):
    with pytest.raises(MinipError) as err:
        tok.word_positions(PROMPT, "dog")
    message = str(err.value)
    assert message.startswith("word 'dog' is not in the prompt 'a painting of")
    assert "words are: 'a', 'painting'" in message and "\n" not in message
    with pytest.raises(MinipError, match="out of range"):
        tok.word_positions(PROMPT, 8)
    with pytest.raises(MinipError, match="not in the prompt 'two\\\\nlines'"):
        tok.word_positions("two\nlines", "x")  # still a one-line message


def test_from_dir_errors(tmp_path):
    with pytest.raises(MinipError, match="no vocab.json in"):
        ClipTokenizer.from_dir(tmp_path)
    shutil.copy(FILES / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(MinipError, match="no merges.txt in"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthis is three\n")
    with pytest.raises(MinipError, match="line 3 is not a merge"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nqq zz\n")
    with pytest.raises(MinipError, match="do not fit together"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(MinipError, match="cannot read the CLIP vocabulary"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(MinipError, match="is not CLIP's vocabulary"):
        ClipTokenizer.from_dir(tmp_path)


def test_merges_without_version_header(tmp_path, tok):
    shutil.copy(FILES / "vocab.json", tmp_path / "vocab.json")
    lines = (FILES / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    (tmp_path / "merges.txt").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    other = ClipTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    for text in PROMPTS:
        assert other.encode(text) == tok.encode(text)
