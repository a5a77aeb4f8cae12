"""Textual-inversion embeddings equal diffusers' `load_textual_inversion` (transformers'
tokenizer and text encoder) on a random model: same token ids, same text states; the tokens
work in P2P word lookups; bad files are one-line errors."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from minip2p.methods import p2p
from minip2p.errors import MinipError
from minip2p.load import load_model

D = 48                                                   # the "small" geometry's text width


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    one = tmp_path / "learned_embeds.safetensors"                       # diffusers: {token: (d,)}
    save_file({"<cat-toy>": torch.randn(D, generator=g)}, one)
    a1111 = tmp_path / "<style-x>.safetensors"                          # A1111: string_to_param
    save_file({"string_to_param.*": torch.randn(3, D, generator=g)}, a1111)
    kohya = tmp_path / "<kohya>.safetensors"                            # kohya: emb_params
    save_file({"emb_params": torch.randn(2, D, generator=g)}, kohya)
    return one, a1111, kohya


PROMPTS = ["a <cat-toy> in the style of <style-x>", "a photo of <kohya> next to a dog",
           "A <CAT-TOY>, riding <style-x>!", "a dog"]


@torch.no_grad()
def test_matches_diffusers_load_textual_inversion(small_ckpt, files):
    pipe, folder = small_ckpt
    ref = copy.deepcopy(pipe)
    one, a1111, kohya = files
    ref.load_textual_inversion(str(one))
    ref.load_textual_inversion(str(a1111), token="<style-x>")
    ref.load_textual_inversion(str(kohya), token="<kohya>")
    model = load_model(folder, embeddings=[one, a1111, kohya])
    for prompt in PROMPTS:
        text = ref.maybe_convert_prompt(prompt, ref.tokenizer)           # "<tok>" -> "<tok> <tok>_1"
        ref_ids = ref.tokenizer([text], padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
        ids = model.tokenizer([prompt])
        assert torch.equal(ids, ref_ids), prompt
        d = (model.text_encoder(ids) - ref.text_encoder(ref_ids).last_hidden_state).abs().max()
        print(f"textual inversion {prompt!r}: text states max|Δ| = {d:.1e}")
        assert d <= 1e-6
    assert len(model.tokenizer) == len(ref.tokenizer) == 49408 + 1 + 3 + 2


def test_tokens_in_p2p_word_lookups(small_ckpt, files):
    _, folder = small_ckpt
    model = load_model(folder, embeddings=files)
    tok = model.tokenizer
    assert tok.word_positions("a <cat-toy> on a table", "<cat-toy>") == [2]
    assert tok.word_positions("a <style-x> dog", "<style-x>") == [2, 3, 4]   # 3 vectors
    assert tok.word_positions("a <style-x> dog", "dog") == [5]
    prompts = ["a <cat-toy> on a table", "a dog on a table"]
    control, _ = p2p.build(tok, prompts, 4, blend=["<cat-toy>", "dog"])    # --blend "<cat-toy>" dog
    assert control is not None


def test_bad_embeddings_are_one_line_errors(small_ckpt, files, tmp_path):
    _, folder = small_ckpt
    wide = tmp_path / "wide.safetensors"
    save_file({"<wide>": torch.zeros(768)}, wide)
    with pytest.raises(MinipError, match=r"768 wide but this model's text encoder is 48 wide"):
        load_model(folder, embeddings=[wide])
    taken = tmp_path / "taken.safetensors"
    save_file({"dog": torch.zeros(D)}, taken)
    with pytest.raises(MinipError, match=r"token 'dog' already exists"):
        load_model(folder, embeddings=[taken])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(MinipError, match=r"not a readable safetensors embedding"):
        load_model(folder, embeddings=[garbage])
    pickled = tmp_path / "learned_embeds.bin"
    pickled.write_bytes(b"not even read")
    with pytest.raises(MinipError, match=r"pickled embeddings are refused"):
        load_model(folder, embeddings=[pickled])
    with pytest.raises(MinipError, match=r"comes twice"):
        load_model(folder, embeddings=[files[0], files[0]])


def test_cli_embedding_in_edit_and_blend(small_ckpt, files, tmp_path, capsys):
    from minip2p.cli import main
    _, folder = small_ckpt
    out = tmp_path / "edit"
    rc = main(["edit", "a <cat-toy> on a table", "a dog on a table", "--blend", "<cat-toy>", "dog",
               "--embedding", str(files[0]), "--embedding", str(files[1]), "--model", str(folder),
               "--steps", "2", "--height", "32", "--width", "32", "--quiet", "--out-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert any(out.iterdir())


@pytest.mark.parametrize("kind", ["wide", "taken", "garbage", "pickle"])
def test_cli_bad_embedding_is_one_line_and_writes_nothing(small_ckpt, tmp_path, capsys, kind):
    from minip2p.cli import main
    _, folder = small_ckpt
    f = tmp_path / ("e.bin" if kind == "pickle" else "e.safetensors")
    if kind == "wide":
        save_file({"<wide>": torch.zeros(768)}, f)
    elif kind == "taken":
        save_file({"the": torch.zeros(D)}, f)
    else:
        f.write_bytes(b"\x00" * 64)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["generate", "a cat", "--embedding", str(f), "--model", str(folder), "--steps", "2",
               "--quiet", "--out", str(out / "a.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("minip2p: "), err
    assert list(out.iterdir()) == []
