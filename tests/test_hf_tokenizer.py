"""Hugging Face ``tokenizer.json`` tokenizers (the Llama 3 / Qwen kind): our ``Tokenizer`` encodes and decodes as
``transformers`` does, appends the specials a family lacks after its vocabulary, and saved folders load back."""

import json
import unicodedata
from pathlib import Path

import pytest

from transfusion.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LEE = Path(__file__).resolve().parents[1] / "data" / "embedded" / "lee_background.txt"
# the split of Llama 3 (and, near enough, Qwen 2): letters, numbers in threes, punctuation, whitespace runs
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
EDGE_CASES = ["", " ", "  two  spaces  ", "\n\nnew\tlines\r\n", "trailing ", " leading", "Grüße, naïve café",
              "日本語のテキスト", "emoji 🦊🐶 and ZWJ 👩‍💻", "e\u0301 (combining)", "$4.00pm AEDT, 1,234,567",
              "it's they're we'll", "<boi> <eoi> <pad> <bos> are plain text", "<|endoftext|> is special"]


def byte_level_bpe(specials: list[str], vocab_size: int = 400) -> "tokenizers.Tokenizer":
    """A byte-level BPE trained on the news text, built as Llama 3's and Qwen's are (split, then bytes)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # Qwen's; Llama 3 has none
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(LEE.read_text().splitlines(), trainer)
    return tok


def save_hf(directory: Path, specials: list[str], **names) -> "transformers.PreTrainedTokenizerFast":
    """The tokenizer as a folder written by transformers (tokenizer.json and tokenizer_config.json)."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(specials), **names)
    hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory):
    """Llama 3's layout: BOS and EOS named in tokenizer_config.json, no PAD, no BOI/EOI."""
    directory = tmp_path_factory.mktemp("llama3")
    hf = save_hf(directory, ["<|begin_of_text|>", "<|end_of_text|>"], bos_token="<|begin_of_text|>",
                 eos_token="<|end_of_text|>")
    return directory, hf


def corpus() -> list[str]:
    return LEE.read_text().splitlines()[:60] + EDGE_CASES


def test_encode_decode_equal_transformers(llama3_like):
    directory, hf = llama3_like
    ours = Tokenizer(directory)
    assert ours.kind == "tokenizer.json" and ours.path == str(directory / "tokenizer.json")
    again = transformers.AutoTokenizer.from_pretrained(directory)  # the saved folder, read by transformers
    for text in corpus():
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False) == again.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)  # lossless up to NFC
        with_specials = ours.encode(text, bos=True, eos=True)
        assert with_specials == [ours.bos_id, *ids, ours.eos_id]
        assert ours.decode([ours.boi_id, *with_specials, ours.eoi_id, ours.pad_id]) == ours.decode(ids)


def test_specials_appended_distinct_and_stable(llama3_like, tmp_path):
    directory, hf = llama3_like
    ours = Tokenizer(directory / "tokenizer.json")
    n = len(hf)  # the vocabulary with its added tokens
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    assert (ours.pad_id, ours.boi_id, ours.eoi_id) == (n, n + 1, n + 2)  # appended in this order
    assert ours.appended_ids == [n, n + 1, n + 2] and ours.vocab_size == n + 3
    assert len(ours.special_ids) == 5
    assert not set(ours.appended_ids) & {i for t in corpus() for i in ours.encode(t)}  # text cannot make them

    # saved and loaded back (the way save_pretrained and `export --llama` write it): the same ids
    assert ours.save(tmp_path) == "tokenizer.json"
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    back = Tokenizer(tmp_path)
    for name in ("bos_id", "eos_id", "pad_id", "boi_id", "eoi_id", "vocab_size", "appended_ids"):
        assert getattr(back, name) == getattr(ours, name), name
    assert all(back.encode(t) == ours.encode(t) for t in corpus())


def test_qwen_layout_gets_a_bos_and_its_own_pad(tmp_path):
    """Qwen: no BOS, PAD = EOS = <|endoftext|>: BOS is appended (it marks document starts, so it cannot be EOS) and
    so is PAD (PAD positions leave the loss, so it cannot be EOS either)."""
    hf = save_hf(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>")
    ours = Tokenizer(tmp_path)
    n = len(hf)
    assert ours.eos_id == hf.eos_token_id == hf.pad_token_id == 0
    assert (ours.pad_id, ours.boi_id, ours.eoi_id, ours.bos_id) == (n, n + 1, n + 2, n + 3)
    assert ours.encode("<|endoftext|> is special") == hf.encode("<|endoftext|> is special", add_special_tokens=False)


def test_bare_tokenizer_json_and_bad_files(tmp_path):
    byte_level_bpe(["<pad>", "<boi>", "<eoi>"]).save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json
    ours = Tokenizer(tmp_path / "tokenizer.json")
    n = ours.base_size
    assert (ours.pad_id, ours.boi_id, ours.eoi_id) == (0, 1, 2)  # found by name
    assert (ours.bos_id, ours.eos_id) == (n, n + 1) and ours.appended_ids == [n, n + 1]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="bad/tokenizer.json' is not a Hugging Face tokenizer.json"):
        Tokenizer(tmp_path / "bad" / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'.*empty' has no tokenizer: neither the SentencePiece tokenizer.model"):
        Tokenizer(tmp_path / "empty")


def test_save_pretrained_carries_the_tokenizer_json(llama3_like, tmp_path, autoencoder_ckpt, one_thread):
    """A module with a tokenizer.json (and frozen text weights, whose special rows are parameters of their own) saves
    a self-contained folder that loads back with the same ids and weights."""
    import torch

    from transfusion.lightning.transfusion import TransfusionModule

    directory, _ = llama3_like
    module = TransfusionModule(str(directory / "tokenizer.json"), autoencoder_ckpt, preset="debug",
                               modality_experts=True, freeze_text=True)
    with torch.no_grad():
        module.model.lm_head.special_rows.add_(1.0)  # trained special rows: saved inside lm_head.weight
    module.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["init_args"]["tokenizer"] == "tokenizer.json"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    loaded = TransfusionModule.from_pretrained(tmp_path / "saved")
    assert loaded.tokenizer.kind == "tokenizer.json"
    assert all(loaded.tokenizer.encode(t, bos=True) == module.tokenizer.encode(t, bos=True) for t in corpus())
    a, b = module.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.model.lm_head.special_rows, module.model.lm_head.special_rows)
