"""Token alignment and schedules (minip2p/align.py), pinned on the paper's own examples.

The pinned tables were checked against the official google/prompt-to-prompt `seq_aligner.py` and
`ptp_utils.get_time_words_attention_alpha` (run outside this repo): refine mappers/alphas and
the schedules agree exactly; word-swap mappers agree exactly with the official code once its
`mapper[j, j]` line (after the last swapped word) is read as `mapper[i, j]` -- the one intended
difference, which only shows when a swap changes the token count (see test_swap_one_to_two).
"""
from pathlib import Path

import pytest
import torch

from minip2p.methods.align import (cross_replace_window, parse_window, refine_mapper, refine_mappers,
                           replace_mapper, replace_mappers, self_replace_range)
from minip2p.errors import MinipError
from minip2p.model.tokenizer import ClipTokenizer

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "clip-tokenizer"
SQUIRREL = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"
LEMUR = "a painting of a lemur eating a burger"        # "lemur" is two tokens: le + mur
PLATYPUS = "a painting of a platypus eating a burger"  # "platypus" is three: plat + y + pus
CASTLE = "a castle next to a river"
CHILDREN = "children drawing of a castle next to a river"


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.from_dir(WEIGHTS)


def shifted_diagonal(start: int, shift: int) -> torch.Tensor:
    """77x77 with ones at (i, i + shift) for i >= start (where that fits), zeros elsewhere."""
    m = torch.zeros(77, 77)
    for i in range(start, 77):
        if 0 <= i + shift < 77:
            m[i, i + shift] = 1.0
    return m


def unchanged_columns_copy_same_token(tok, source, target, mapper, changed_targets):
    """Every unchanged target token is fed by exactly one source token, and it is the same id."""
    src, tgt = tok.encode(source)[0], tok.encode(target)[0]
    for n in range(77):
        if n in changed_targets or mapper[:, n].sum() == 0:
            continue
        (w,) = mapper[:, n].nonzero().flatten().tolist()
        assert mapper[w, n] == 1 and src[w] == tgt[n], (n, w)


# ----------------------------------------------------------------------------------- word swap

def test_token_counts_of_the_examples(tok):
    assert [len(tok.tokenize(w)) for w in ("squirrel", "lion", "lemur", "platypus")] == [1, 1, 2, 3]


def test_swap_same_token_count_is_identity(tok):
    m = replace_mapper(tok, SQUIRREL, LION)           # squirrel (pos 5) -> lion (pos 5)
    assert m.shape == (77, 77) and m.dtype == torch.float32
    assert torch.equal(m, torch.eye(77))


def test_swap_one_to_two(tok):
    m = replace_mapper(tok, SQUIRREL, LEMUR)
    expected = torch.zeros(77, 77)
    expected[range(5), range(5)] = 1.0                # <start> a painting of a
    expected[5, 5] = expected[5, 6] = 0.5             # squirrel -> le, mur: 1/m with m = 2
    expected += shifted_diagonal(6, +1)               # eating(6)->7, a(7)->8, burger(8)->9, ...
    assert torch.equal(m, expected)
    # The official code writes mapper[j, j] here and would feed target 7 ("eating") from source 7
    # ("a"); we feed it from source 6 ("eating").
    assert m[6, 7] == 1 and m[7, 7] == 0
    assert torch.equal(m.sum(1), torch.tensor([1.0] * 76 + [0.0]))   # last source pad unused
    assert torch.equal(m.sum(0), torch.tensor([1.0] * 5 + [0.5, 0.5] + [1.0] * 70))
    unchanged_columns_copy_same_token(tok, SQUIRREL, LEMUR, m, {5, 6})


def test_swap_two_to_one(tok):
    m = replace_mapper(tok, LEMUR, SQUIRREL)
    expected = torch.zeros(77, 77)
    expected[range(5), range(5)] = 1.0
    expected[5, 5] = expected[6, 5] = 1.0             # le, mur -> squirrel: 1/m with m = 1
    expected += shifted_diagonal(7, -1)               # eating(7)->6, a(8)->7, ...
    assert torch.equal(m, expected)
    assert torch.equal(m.sum(1), torch.ones(77))      # every source token is used once
    assert torch.equal(m.sum(0), torch.tensor([1.0] * 5 + [2.0] + [1.0] * 70 + [0.0]))
    unchanged_columns_copy_same_token(tok, LEMUR, SQUIRREL, m, {5})


def test_swap_two_to_three(tok):
    m = replace_mapper(tok, LEMUR, PLATYPUS)
    expected = torch.zeros(77, 77)
    expected[range(5), range(5)] = 1.0
    for w in (5, 6):                                  # le, mur -> plat, y, pus: 1/3 each
        for n in (5, 6, 7):
            expected[w, n] = 1.0 / 3.0
    expected += shifted_diagonal(7, +1)
    assert torch.equal(m, expected)
    assert torch.allclose(m.sum(1)[:76], torch.ones(76))
    assert torch.allclose(m[:, 5:8].sum(0), torch.full((3,), 2.0 / 3.0))   # k/m per column


def test_swap_two_words(tok):
    source, target = LEMUR, "a photo of a squirrel eating a platypus"
    m = replace_mapper(tok, source, target)
    expected = torch.zeros(77, 77)
    expected[[0, 1, 3, 4], [0, 1, 3, 4]] = 1.0
    expected[2, 2] = 1.0                              # painting -> photo (1 -> 1: paired)
    expected[5, 5] = expected[6, 5] = 1.0             # le, mur -> squirrel
    expected[7, 6] = expected[8, 7] = 1.0             # eating, a
    expected[9, [8, 9, 10]] = 1.0 / 3.0               # burger -> plat, y, pus
    expected += shifted_diagonal(10, +1)              # <end> and padding, net shift +1
    assert torch.equal(m, expected)


def test_swap_needs_same_word_count(tok):
    with pytest.raises(MinipError, match="refine") as err:
        replace_mapper(tok, CASTLE, CHILDREN)
    assert "\n" not in str(err.value)


def test_replace_mappers_batch(tok):
    ms = replace_mappers(tok, [SQUIRREL, LION, LEMUR])
    assert ms.shape == (2, 77, 77)
    assert torch.equal(ms[0], replace_mapper(tok, SQUIRREL, LION))
    assert torch.equal(ms[1], replace_mapper(tok, SQUIRREL, LEMUR))


# ----------------------------------------------------------------------------------- refine

def test_refine_castle(tok):
    mapper, alpha = refine_mapper(tok, CASTLE, CHILDREN)
    # target: <start> children drawing of a castle next to a river <end> | padding
    assert mapper.dtype == torch.long and mapper.shape == alpha.shape == (77,)
    assert mapper[:11].tolist() == [0, -1, -1, -1, 1, 2, 3, 4, 5, 6, 7]
    assert alpha[:11].tolist() == [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert torch.equal(mapper[11:], torch.arange(11, 77))      # padding n -> n (official)
    assert torch.equal(alpha[11:], torch.ones(66))


def test_refine_soup(tok):
    mapper, alpha = refine_mapper(tok, "a bowl of soup", "a bowl of pea soup")
    assert mapper[:7].tolist() == [0, 1, 2, 3, -1, 4, 5]       # "pea" (4) is new
    assert torch.equal(mapper[7:], torch.arange(7, 77))
    assert alpha.tolist() == [1.0] * 4 + [0.0] + [1.0] * 72


def test_refine_ties_prefer_insertion_then_deletion(tok):
    # "a cat" -> "cat a": either word could stay aligned. Tracing back from the end, the tie at
    # the last target word goes to an insertion, so that one ("a") is new and "cat" is kept.
    mapper, alpha = refine_mapper(tok, "a cat", "cat a")
    assert mapper[:4].tolist() == [0, 2, -1, 3] and alpha[:4].tolist() == [1, 1, 0, 1]
    mapper, alpha = refine_mapper(tok, "cat a", "a cat")
    assert mapper[:4].tolist() == [0, 2, -1, 3] and alpha[:4].tolist() == [1, 1, 0, 1]


def test_refine_aligned_tokens_match(tok):
    for source, target in [(CASTLE, CHILDREN), (SQUIRREL, "a cat"), ("a", SQUIRREL), (LEMUR, LEMUR)]:
        mapper, alpha = refine_mapper(tok, source, target)
        src, tgt = tok.encode(source)[0], tok.encode(target)[0]
        for n in range(77):
            assert (alpha[n] == 1) == (mapper[n] >= 0)
            if alpha[n] == 1 and n < len(tok.tokenize(target)) + 2:
                assert src[mapper[n]] == tgt[n]
    mapper, alpha = refine_mapper(tok, LEMUR, LEMUR)
    assert torch.equal(mapper, torch.arange(77)) and torch.equal(alpha, torch.ones(77))


def test_refine_mappers_batch(tok):
    mappers, alphas = refine_mappers(tok, [CASTLE, CHILDREN, CASTLE])
    assert mappers.shape == alphas.shape == (2, 77)
    assert torch.equal(mappers[1], torch.arange(77)) and torch.equal(alphas[1], torch.ones(77))


# ----------------------------------------------------------------------------------- schedules

def test_cross_alpha_float(tok):
    a = cross_replace_window(tok, [SQUIRREL, LION], 10, 0.8)
    assert a.shape == (11, 1, 77)
    assert torch.equal(a[:8], torch.ones(8, 1, 77))           # int(0.8 * 11) = 8
    assert torch.equal(a[8:], torch.zeros(3, 1, 77))


def test_cross_alpha_pair(tok):
    a = cross_replace_window(tok, [SQUIRREL, LION], 10, (0.2, 0.8))
    assert a[:, 0, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]   # rows 2 .. 7


def test_cross_alpha_word(tok):
    a = cross_replace_window(tok, [SQUIRREL, LION], 10, {"default_": 0.8, "lion": 0.4})
    assert a[:, 0, 5].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]   # lion: int(0.4 * 11) = 4
    others = torch.cat([a[:, 0, :5], a[:, 0, 6:]], dim=1)
    assert torch.equal(others, torch.tensor([[1.0]] * 8 + [[0.0]] * 3).expand(11, 76))


def test_cross_alpha_dict_without_default(tok):
    a = cross_replace_window(tok, [SQUIRREL, LION, LEMUR], 10, {"lemur": (0.5, 1.0)})
    assert torch.equal(a[:, 0], torch.ones(11, 77))          # default (0, 1); no lemur in P*_1
    assert a[:, 1, 5].tolist() == a[:, 1, 6].tolist() == [0] * 5 + [1] * 6
    assert torch.equal(a[:, 1, 7:], torch.ones(11, 70))


def test_cross_alpha_errors(tok):
    for window in (1.5, -0.1, (0.8, 0.2), (0.1, 0.5, 0.9), "0.5", {"default_": 2.0}):
        with pytest.raises(MinipError):
            cross_replace_window(tok, [SQUIRREL, LION], 10, window)
    with pytest.raises(MinipError, match="tiger.*lion eating") as err:
        cross_replace_window(tok, [SQUIRREL, LION], 10, {"tiger": 0.3})
    assert "\n" not in str(err.value)
    with pytest.raises(MinipError, match="squirrel"):      # only the edited prompts count
        cross_replace_window(tok, [SQUIRREL, LION], 10, {"squirrel": 0.3})


def test_self_replace_range():
    assert self_replace_range(50, 0.4) == (0, 20)
    assert self_replace_range(50, (0.2, 0.6)) == (10, 30)
    assert self_replace_range(10, 1.0) == (0, 10)
    with pytest.raises(MinipError):
        self_replace_range(50, (0.6, 0.2))


def test_parse_window():
    assert parse_window("0.8") == 0.8
    assert parse_window(" 0.2,0.8 ") == (0.2, 0.8)
    assert parse_window("default=1.0,lion=0.4") == {"default_": 1.0, "lion": 0.4}
    assert parse_window("lion=0.2:0.6") == {"lion": (0.2, 0.6)}
    for bad in ("", "abc", "0.1,0.2,0.3", "lion=", "=0.3", "lion=0.1:0.2:0.3", "lion=0.3,lion=0.4",
                "default=1.0,lion", "1.5", "0.8,0.2", "lion=a=b"):
        with pytest.raises(MinipError, match="expected|start") as err:
            parse_window(bad)
        assert "\n" not in str(err.value)
