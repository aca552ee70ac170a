"""LMFusion through the CLI: a Hugging Face Llama folder starts a Mixture-of-Transformers Transfusion whose text
weights stay frozen: text-only logits equal Hugging Face's before training and stay bit-identical after image
training steps, while the image weights (copied from the text weights) and the patch layers train."""

import pytest
import torch

from transfusion.cli import cli_main

transformers = pytest.importorskip("transformers")


@torch.no_grad()
def text_logits(model, tokens):
    hidden, _ = model(tokens, torch.zeros_like(tokens), torch.full_like(tokens, -1))
    return model.lm_head(hidden)


@pytest.mark.slow
def test_frozen_text_weights_keep_text_logits_bit_identical(tmp_path, tokenizer_path, autoencoder_ckpt):
    from test_cli import _fit_args
    from test_llama import make_llama

    from transfusion.lightning.transfusion import TransfusionModule

    llama_dir = tmp_path / "llama"
    llama_dir.mkdir()
    hf = make_llama(llama_dir, tokenizer_path, max_position_embeddings=256)
    tokens = torch.randint(0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits

    options = ["--model.init_args.text_model", str(llama_dir), "--model.init_args.modality_experts", "true",
               "--model.init_args.preset", "null"]  # the shape is the text model's
    start = TransfusionModule(tokenizer_path, autoencoder_ckpt, text_model=str(llama_dir), modality_experts=True)
    start._load_text_model(str(llama_dir))  # what a fresh fit does first
    before = text_logits(start.model, tokens)
    V = hf.config.vocab_size  # our vocabulary adds the special tokens a Llama tokenizer lacks (this one has them)
    assert start.config.vocab_size >= V
    torch.testing.assert_close(before[..., :V], reference, atol=1e-5, rtol=0)
    params = dict(start.model.named_parameters())
    assert torch.equal(params["transformer.layers.0.image.ffn.w2.weight"], params["transformer.layers.0.ffn.w2.weight"])

    cli = cli_main(["fit", *_fit_args(tmp_path / "run", tokenizer_path, autoencoder_ckpt, steps=3), *options,
                    "--model.init_args.freeze_text", "true"])
    trained = cli.model.model.cpu().eval()
    after = text_logits(trained, tokens)
    assert torch.equal(before, after)  # frozen text weights: bit for bit
    after_params = dict(trained.named_parameters())
    for name in ("transformer.layers.0.image.ffn.w2.weight", "transformer.image_norm.weight"):
        assert not torch.equal(after_params[name], params[name]), name  # the image side trained
    assert any(not torch.equal(after_params[n], params[n]) for n in params if n.startswith("patch_encoder."))

    # `transfusion export --llama`: the text weights as a Llama folder that transformers reads, logits unchanged
    from transfusion.export import export_main

    ckpt = cli.trainer.checkpoint_callback.last_model_path
    export_main(["--ckpt_path", ckpt, "--output", str(tmp_path / "exported"), "--llama"])
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, reference, atol=1e-5, rtol=0)

    # the checkpoint holds the weights and the shape: it loads without the text model's folder
    for f in llama_dir.iterdir():
        f.unlink()
    reloaded = TransfusionModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert torch.equal(text_logits(reloaded.model, tokens), before)
    llama_dir.rmdir()
    hf = make_llama(llama_dir, tokenizer_path, max_position_embeddings=256)

    # the same run without freezing: the text weights move
    free = cli_main(["fit", *_fit_args(tmp_path / "free", tokenizer_path, autoencoder_ckpt, steps=3), *options])
    assert not torch.equal(text_logits(free.model.model.cpu().eval(), tokens), before)


def test_text_model_options_are_checked(tmp_path, tokenizer_path, autoencoder_ckpt):
    from test_llama import make_llama

    from transfusion.lightning.transfusion import TransfusionModule

    with pytest.raises(ValueError, match="freeze_text needs modality_experts"):
        TransfusionModule(tokenizer_path, autoencoder_ckpt, freeze_text=True)
    make_llama(tmp_path, tokenizer_path)
    with pytest.raises(ValueError, match=r"differ from the shape of text_model .*'dim': \(32, 64\)"):
        TransfusionModule(None, autoencoder_ckpt, text_model=str(tmp_path), transformer={"dim": 32})
    with pytest.raises(ValueError, match="differ from the shape of text_model"):
        TransfusionModule(None, autoencoder_ckpt, text_model=str(tmp_path), preset="cpu-small")
    with pytest.raises(ValueError, match="text_model and init_from both"):
        TransfusionModule(None, autoencoder_ckpt, text_model=str(tmp_path), init_from="x.ckpt")
    with pytest.raises(ValueError, match="not in transformer"):
        TransfusionModule(tokenizer_path, autoencoder_ckpt, transformer={"modality_experts": True})
    with pytest.raises(ValueError, match="sampler 'ddpm' cannot sample a model trained with objective 'flow'"):
        TransfusionModule(tokenizer_path, autoencoder_ckpt, objective="flow")
    module = TransfusionModule(None, autoencoder_ckpt, text_model=str(tmp_path), modality_experts=True)
    assert module.hparams.tokenizer == str(tmp_path / "tokenizer.model")
    assert module.config.transformer.ffn_dim == 176 and module.config.transformer.modality_experts


def test_frozen_text_weights_train_only_the_special_rows(one_thread):
    """AdamW with weight decay and gradient clipping: the special rows move, every other row stays bit for bit; the
    state dict keeps nn.Embedding / nn.Linear's layout and loads into a frozen or a plain model alike."""
    from test_mot import batch, pair

    from transfusion.lightning.optim import adamw_cosine
    from transfusion.models.lmfusion import SpecialRows, freeze_text_weights

    _, mot = pair()
    plain_keys = {k: v.shape for k, v in mot.state_dict().items()}
    start = {k: v.clone() for k, v in mot.state_dict().items()}
    special = [4, 5, 97, 98, 99]  # BOI, EOI inside the vocabulary (as reserved by `transfusion tokenizer`), appended
    trainable = freeze_text_weights(mot, special)
    assert isinstance(mot.embedding, SpecialRows) and isinstance(mot.lm_head, SpecialRows)
    assert mot.embedding.special_rows.requires_grad and not mot.embedding.weight.requires_grad
    assert trainable == sum(p.numel() for p in mot.parameters() if p.requires_grad)
    assert freeze_text_weights(mot, special) == trainable  # again: nothing changes
    assert {k: v.shape for k, v in mot.state_dict().items()} == plain_keys

    tokens, doc, img, latents, t = batch()
    tokens[:, ::3] = torch.tensor(special).repeat(14)[: tokens[:, ::3].numel()].view(2, -1)  # inputs and targets
    text = torch.randint(6, 97, (2, 30), generator=torch.Generator().manual_seed(3))  # text: no special among them
    before = text_logits(mot, text)
    optimizer = adamw_cosine(mot.parameters(), 1e-2, (0.9, 0.95), 1e-8, 0.1, 0, 0.05, 10)["optimizer"]
    for _ in range(3):
        loss = mot.loss(tokens, doc, img, latents, t.clamp(max=999))["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mot.parameters(), 1e-3)  # clipping scales every gradient
        optimizer.step()

    frozen = [i for i in range(100) if i not in special]
    after = mot.state_dict()
    for name in ("embedding.weight", "lm_head.weight"):
        assert torch.equal(after[name][frozen], start[name][frozen]), name  # bit for bit, weight decay or not
        assert (after[name][special] != start[name][special]).any(dim=1).all(), name  # every special row moved
    assert all(torch.equal(after[k], start[k]) for k in start if k.startswith("transformer.layers.0.attention."))
    assert torch.equal(text_logits(mot, text)[..., frozen], before[..., frozen])  # text logits, but the specials'

    plain = pair()[1]
    plain.load_state_dict(after)  # an unfrozen model reads the checkpoint of a frozen one
    ours, theirs = text_logits(mot, text), text_logits(plain, text)
    assert torch.equal(ours[..., frozen], theirs[..., frozen])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # special columns: their own (smaller) matmul
    refrozen = pair()[1]
    freeze_text_weights(refrozen, special)
    refrozen.load_state_dict(plain.state_dict())  # and the other way
    assert torch.equal(refrozen.lm_head.special_rows, mot.lm_head.special_rows)
    assert torch.equal(text_logits(refrozen, text), text_logits(mot, text))
