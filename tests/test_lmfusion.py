"""LMFusion through the CLI: a Hugging Face Llama folder (tokenizer.json) starts a Mixture-of-Transformers Transfusion
whose text weights stay frozen: text-only logits equal Hugging Face's before training and stay bit-identical after
image training steps, while the image weights (copied from the text weights), the patch layers and the special
tokens' rows train; unfrozen, the text weights train at their own learning rate (text_lr)."""

import pytest
import torch

from transfusion.cli import cli_main

transformers = pytest.importorskip("transformers")


@torch.no_grad()
def text_logits(model, tokens):
    hidden, _ = model(tokens, torch.zeros_like(tokens), torch.full_like(tokens, -1))
    return model.lm_head(hidden)


def make_hf_llama(directory, seed=0, family="llama3"):
    """A small random causal LM saved by transformers, with only a byte-level BPE tokenizer.json beside it:
    ``llama3``: LlamaForCausalLM with grouped-query attention and llama3 RoPE scaling, BOS and EOS in
    tokenizer_config.json; ``qwen2``: Qwen2ForCausalLM with q/k/v biases, tied embeddings and Qwen's tokenizer
    layout (no BOS, PAD = EOS). Neither has PAD, BOI or EOI of its own."""
    from test_hf_tokenizer import save_hf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=176, max_position_embeddings=256)
    if family == "llama3":
        hf_tok = save_hf(directory, ["<|begin_of_text|>", "<|end_of_text|>"], bos_token="<|begin_of_text|>",
                         eos_token="<|end_of_text|>")
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500.0}
        config = transformers.LlamaConfig(vocab_size=len(hf_tok), rms_norm_eps=1e-5, rope_parameters=rope,
                                          tie_word_embeddings=False, **common)
        model_class = transformers.LlamaForCausalLM
    else:
        hf_tok = save_hf(directory, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
        config = transformers.Qwen2Config(vocab_size=len(hf_tok), rms_norm_eps=1e-6, rope_theta=10000.0,
                                          tie_word_embeddings=True, use_sliding_window=False, **common)
        model_class = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    with torch.no_grad():  # norms and biases random too, so that every weight matters
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    assert not (directory / "tokenizer.model").exists()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_frozen_text_weights_keep_text_logits_bit_identical(tmp_path, autoencoder_ckpt, family):
    """LMFusion through `transfusion fit` from a Llama 3 / Qwen2 folder: frozen text logits bit for bit, the special
    rows and the image side train, caption -> image runs, `export --llama` reads back in transformers."""
    from test_cli import _fit_args

    from transfusion.export import export_main
    from transfusion.lightning.transfusion import TransfusionModule
    from transfusion.models.lmfusion import is_text_weight

    llama_dir = tmp_path / "llama"
    hf = make_hf_llama(llama_dir, family=family)
    V = hf.config.vocab_size
    tokens = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits

    options = ["--model.init_args.text_model", str(llama_dir), "--model.init_args.modality_experts", "true",
               "--model.init_args.preset", "null", "--model.init_args.tokenizer", "null"]  # the text model's
    start = TransfusionModule(None, autoencoder_ckpt, text_model=str(llama_dir), modality_experts=True,
                              freeze_text=True)
    tok = start.tokenizer
    appended = 3 if family == "llama3" else 4  # PAD, BOI, EOI (and BOS: Qwen has none)
    assert tok.path == str(llama_dir / "tokenizer.json") and tok.appended_ids == list(range(V, V + appended))
    assert (tok.pad_id, tok.boi_id, tok.eoi_id) == (V, V + 1, V + 2) and start.config.vocab_size == V + appended
    assert (start.config.transformer.kv_heads, start.config.transformer.qkv_bias) == (2, family == "qwen2")
    start._load_text_model(str(llama_dir))  # what a fresh fit does first
    before = text_logits(start.model, tokens)
    torch.testing.assert_close(before[..., :V], reference, atol=1e-5, rtol=0)
    params = {k: v.clone() for k, v in start.model.state_dict().items()}
    assert torch.equal(params["transformer.layers.0.image.ffn.w2.weight"], params["transformer.layers.0.ffn.w2.weight"])

    cli = cli_main(["fit", *_fit_args(tmp_path / "run", "unused", autoencoder_ckpt, steps=3), *options,
                    "--model.init_args.freeze_text", "true"])
    trained = cli.model.model.cpu().eval()
    after = text_logits(trained, tokens)
    assert torch.equal(before[..., :V], after[..., :V])  # frozen text weights: bit for bit
    assert (before[..., V:] != after[..., V:]).all()  # the PAD, BOI and EOI columns learn
    after_params = trained.state_dict()
    for name in ("embedding.weight", "lm_head.weight"):
        assert torch.equal(after_params[name][:V], params[name][:V]), name  # the text model's rows
        assert (after_params[name][V:] != params[name][V:]).any(dim=1).all(), name  # PAD, BOI and EOI moved
    for name in ("transformer.layers.0.image.ffn.w2.weight", "transformer.image_norm.weight"):
        assert not torch.equal(after_params[name], params[name]), name  # the image side trained
    assert any(not torch.equal(after_params[n], params[n]) for n in params if n.startswith("patch_encoder."))
    images = cli.model.generate_images(["a small red circle"])  # caption -> image with the frozen text model
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()

    # `transfusion export --llama`: the text weights as a Llama folder that transformers reads, logits unchanged
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    exported_dir = tmp_path / "exported"
    export_main(["--ckpt_path", ckpt, "--output", str(exported_dir), "--llama"])
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in exported_dir.iterdir()}
    exported = transformers.AutoModelForCausalLM.from_pretrained(exported_dir, attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    assert type(exported) is type(hf)  # the family it started from
    with torch.no_grad():
        logits = exported(tokens).logits
    torch.testing.assert_close(logits[..., :V], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, after, atol=1e-5, rtol=0)  # the special rows too
    exported_tok = transformers.AutoTokenizer.from_pretrained(exported_dir)
    assert exported_tok.encode("Bushfires near Sydney.", add_special_tokens=False) == tok.encode(
        "Bushfires near Sydney.")

    # the checkpoint holds the weights and the shape: it loads without the text model's weights (not its tokenizer)
    for name in ("model.safetensors", "config.json"):
        (llama_dir / name).unlink()
    reloaded = TransfusionModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert torch.equal(text_logits(reloaded.model, tokens), after)
    if family != "llama3":
        return
    hf = make_hf_llama(tmp_path / "llama", family=family)

    # the same run without freezing, the text weights at text_lr: they move, at their own learning rate
    free = cli_main(["fit", *_fit_args(tmp_path / "free", "unused", autoencoder_ckpt, steps=2), *options,
                     "--model.init_args.text_lr", "3e-4"])  # lr 3e-3 (_fit_args)
    names = {id(p): n for n, p in free.model.model.named_parameters()}
    initial = {names[id(p)]: g["initial_lr"] for g in free.trainer.optimizers[0].param_groups for p in g["params"]}
    assert set(initial) == set(names.values())
    assert all(lr == (3e-4 if is_text_weight(n) else 3e-3) for n, lr in initial.items())
    assert not torch.equal(text_logits(free.model.model.cpu().eval(), tokens)[..., :V], before[..., :V])


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
