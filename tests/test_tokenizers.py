"""Tokenizers: trained on any text source by the command; a Llama-2-layout model (no PAD/BOI/EOI) gets the
specials appended after its last piece, so no piece changes meaning and no text can produce them."""

import json

import sentencepiece as spm

from transfusion.cli import tokenizer_main
from transfusion.data.tokenizer import Tokenizer

TEXT = [f"sentence {i} tells of the quick brown fox and the lazy dog number {i % 7}." for i in range(300)]


def test_tokenizer_command_on_jsonl_and_image_folder_captions(tmp_path, capsys):
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXT))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ["a zebra"]}) + "\n")
    out = tmp_path / "tok.model"
    tokenizer_main(["--output", str(out), "--vocab_size", "300", "--text_files", str(tmp_path / "corpus.jsonl"),
                    "--text_column", "body", "--captions_from", str(tmp_path / "images")])
    assert "from 270 documents and 1 captions" in capsys.readouterr().out  # the training split only
    tok = Tokenizer(out)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id) == (1, 2, 3, 4, 5)
    assert tok.decode(tok.encode("the lazy zebra", bos=True, eos=True)) == "the lazy zebra"


def test_llama_layout_gets_specials_appended_safely(tmp_path):
    path = tmp_path / "llama.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_prefix=str(tmp_path / "llama"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2)  # the Llama 2 layout: no PAD, BOI, EOI
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer(path)
    n = sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id) == (1, 2) and (tok.pad_id, tok.boi_id, tok.eoi_id) == (n, n + 1, n + 2)
    assert tok.vocab_size == n + 3
    text = "the quick <boi> fox <eoi> <pad>"
    assert tok.encode(text) == sp.encode(text)  # every existing id keeps its meaning
    assert not {tok.pad_id, tok.boi_id, tok.eoi_id} & set(tok.encode(text))  # text cannot make a special
    assert tok.decode([tok.bos_id, *tok.encode("the dog"), tok.boi_id, tok.eoi_id, tok.pad_id]) == "the dog"
