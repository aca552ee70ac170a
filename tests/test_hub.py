"""``save_pretrained`` / ``from_pretrained`` (huggingface_hub's ``ModelHubMixin``, ``transfusion.lightning.hub``) and
``transfusion export``: a saved folder reloads the same module (weights, logits, images for a seed), holds only
safetensors, JSON and SentencePiece files (no pickle), and a folder it cannot load is refused by name.

Every weight of the tiny debug modules, the frozen autoencoder's included, is moved off its initial value, so only
a load of all of them reproduces the outputs. Offline: ``push_to_hub`` and Hub repo ids are not exercised.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FILES = ["README.md", "config.json", "model.safetensors", "tokenizer.model"]


def _perturbed(module):
    module.configure_model()  # TransfusionModule builds its network lazily
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():  # the frozen autoencoder's too
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def transfusion_module(tokenizer_path, autoencoder_ckpt):
    from transfusion.lightning.transfusion import TransfusionModule

    torch.manual_seed(0)
    return _perturbed(TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", num_steps=4))


@pytest.fixture(scope="module")
def chameleon_module(tokenizer_path, vq_ckpt):
    from transfusion.lightning.chameleon import ChameleonModule

    torch.manual_seed(0)
    return _perturbed(ChameleonModule(tokenizer_path, vq_ckpt, preset="debug"))


@pytest.fixture(params=["transfusion", "chameleon"])
def module(request):
    return request.getfixturevalue(f"{request.param}_module")


def _assert_same_module(loaded, module):
    assert type(loaded) is type(module) and not loaded.training and loaded.config == module.config
    a, b = module.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    text = "a red circle above a blue square"
    assert loaded.tokenizer.encode(text) == module.tokenizer.encode(text)

    tokens = torch.tensor([module.tokenizer.encode(text, bos=True, eos=True)])  # (1, L)
    doc_ids, at = torch.ones_like(tokens), torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(loaded.text_logits(tokens, doc_ids, at), module.text_logits(tokens, doc_ids, at))
    captions, seeds = ["a red circle", "a green square"], [3, 4]
    images = loaded.generate_images(captions, seeds)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(images, module.generate_images(captions, seeds))


def test_from_pretrained_reproduces_the_module(module, tmp_path):
    module.save_pretrained(tmp_path / "a")
    loaded = type(module).from_pretrained(tmp_path / "a")
    _assert_same_module(loaded, module)

    loaded.save_pretrained(tmp_path / "b")  # a loaded module saves the same folder again
    for name in FILES:
        if name != "model.safetensors":  # its header's metadata is a map written in no fixed order
            assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    a, b = (load_file(tmp_path / folder / "model.safetensors") for folder in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_folder_is_safetensors_json_and_sentencepiece(module, tmp_path):
    import sentencepiece as spm
    from safetensors import safe_open

    module.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == FILES  # no .bin / .ckpt / .pt
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(module.state_dict()) and f.metadata()["format"] == "pt"
        assert any(k.startswith("autoencoder.") for k in f.keys())  # the frozen autoencoder's weights
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["class_path"].endswith(type(module).__name__)
    # self-contained: the tokenizer beside it, the autoencoder as its settings, no path to another file
    assert config["init_args"]["tokenizer"] == "tokenizer.model"
    assert config["init_args"]["autoencoder"]["image_size"] == 16
    assert config["config"]["transformer.n_layers"] == module.config.transformer.n_layers
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size() > 0
    card = (tmp_path / "README.md").read_text()
    assert "library_name: transfusion" in card and f"{type(module).__name__}.from_pretrained" in card


def test_a_module_saved_before_first_use_saves_its_network(tokenizer_path, autoencoder_ckpt, tmp_path):
    from transfusion.lightning.transfusion import TransfusionModule

    module = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", num_steps=4)  # built lazily
    module.save_pretrained(tmp_path)
    assert "model.lm_head.weight" in load_file(tmp_path / "model.safetensors")
    _assert_same_module(TransfusionModule.from_pretrained(tmp_path), module.eval())


def test_from_pretrained_refuses_a_folder_it_cannot_load(transfusion_module, tmp_path):
    from transfusion.lightning.chameleon import ChameleonModule
    from transfusion.lightning.transfusion import TransfusionModule

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json' does not exist; is .* a folder written by"):
        TransfusionModule.from_pretrained(tmp_path / "empty")

    transfusion_module.save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match=r"holds a TransfusionModule \(transfusion\.lightning\.transfusion\."
                                         r"TransfusionModule\), not a ChameleonModule"):
        ChameleonModule.from_pretrained(tmp_path / "t")

    config_path = tmp_path / "t" / "config.json"
    config = json.loads(config_path.read_text())
    config["config"]["transformer.n_layers"] += 1  # saved from another architecture than its arguments build
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mismatched fields:\n  transformer\.n_layers: checkpoint 3 != config 2"):
        TransfusionModule.from_pretrained(tmp_path / "t")

    config_path.write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))  # another library's folder
    with pytest.raises(ValueError, match="not written by transfusion's save_pretrained"):
        TransfusionModule.from_pretrained(tmp_path / "t")

    transfusion_module.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors' does not exist"):
        TransfusionModule.from_pretrained(tmp_path / "w")


def test_export_of_a_plain_trainer_checkpoint(module, tmp_path, capsys):
    """A checkpoint without LightningCLI's _class_path: the class is told from its hyper-parameters."""
    import lightning as L

    from transfusion.cli import main

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    assert "_class_path" not in torch.load(tmp_path / "plain.ckpt", weights_only=True)["hyper_parameters"]

    main(["export", "--ckpt_path", str(tmp_path / "plain.ckpt"), "--output", str(tmp_path / "export")])
    assert "model.safetensors" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == FILES
    _assert_same_module(type(module).from_pretrained(tmp_path / "export", map_location="cpu"), module)


def test_from_pretrained_of_a_hub_repo_id(transfusion_module, tmp_path):
    """A repo id goes through hf_hub_download: here from a Hugging Face cache laid out as a download leaves it."""
    from transfusion.lightning.transfusion import TransfusionModule

    repo = tmp_path / "cache" / "models--someone--tiny-transfusion"
    transfusion_module.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    loaded = TransfusionModule.from_pretrained("someone/tiny-transfusion", cache_dir=tmp_path / "cache",
                                               local_files_only=True)  # offline
    _assert_same_module(loaded, transfusion_module)
    assert loaded.tokenizer.path.startswith(str(repo))  # the tokenizer of the repo, not the original file
