"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for the LightningModules (huggingface_hub's mixin).

A saved folder (or Hub repo) holds

* ``model.safetensors``: every tensor of the module (the frozen autoencoder's too);
* ``config.json``: ``{"class_path", "init_args", "config"}``: the module's arguments (the frozen autoencoder's as
  its settings, the tokenizer as the file beside it) and its resolved architecture, checked again on load;
* the tokenizer (modules with one), so the folder is self-contained: the SentencePiece ``tokenizer.model``, or the
  Hugging Face ``tokenizer.json`` with its ``tokenizer_config.json``;
* ``vae/``: a diffusers ``AutoencoderKL`` (``VQModel``) used as the frozen autoencoder, in the diffusers layout
  (its weights are then not in ``model.safetensors``);
* ``README.md``: the model card.

A folder is written whole or not at all (``config.json``, which loading reads first, comes last). Loading
unpickles nothing. Optimizer state is not saved: to continue training, use the Lightning checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file

from transfusion.atomic import atomic_folder
from transfusion.data.tokenizer import HF_CONFIG, HUGGING_FACE
from transfusion.errors import UserError, user_error
from transfusion.lightning.checkpoint import check_config, flatten_config

WEIGHTS, CONFIG, VAE = "model.safetensors", "config.json", "vae"
PAPER = "https://arxiv.org/abs/2408.11039"
MODEL_CARD = """---
{{ card_data }}
---

`{{ class_name }}` weights of the `transfusion` package ([Transfusion]({{ paper_url }}), Zhou et al. 2024):
`model.safetensors` holds every tensor of the module (a frozen autoencoder's too), `config.json` its arguments
and architecture.

```python
from {{ module }} import {{ class_name }}

model = {{ class_name }}.from_pretrained("this-repo-id-or-folder")  # eval mode, on the CPU
```
"""


class HubMixin(ModelHubMixin, library_name="transfusion", paper_url=PAPER, tags=["transfusion"],
               model_card_template=MODEL_CARD):
    """Hugging Face saving and loading for a LightningModule with ``hparams`` (its arguments) and ``config``.

    * ``module.save_pretrained(folder)`` writes the folder described in this file's docstring;
    * ``Module.from_pretrained(folder_or_repo_id, map_location="cpu")`` rebuilds the module from ``config.json``
      (refusing a folder of another class or architecture), loads the weights and returns it in eval mode; a repo
      id is downloaded through the Hugging Face cache (``revision``, ``cache_dir``, ``token``, ``local_files_only``
      as for ``hf_hub_download``);
    * ``module.push_to_hub("user/name")`` saves to a temporary folder and uploads it to that model repo (created if
      missing; ``private``, ``branch``, ``create_pr``, ``commit_message`` as for ``HfApi.upload_folder``), after
      ``hf auth login`` or with ``token=``.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A saved folder that cannot be loaded (bad JSON, truncated weights, wrong arguments) is a UserError naming
        it; errors of a Hub download are the Hub's."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if user_error(error) is not None or not os.path.isdir(pretrained_model_name_or_path):
                raise
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:500]
            raise UserError(f"{str(pretrained_model_name_or_path)!r} cannot be loaded as a {cls.__name__} "
                            f"({reason})") from error

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict | None = None, **push_to_hub_kwargs):
        """``ModelHubMixin.save_pretrained``, whole or not at all: written to a temporary folder beside
        ``save_directory``, then moved in with ``config.json`` last (``transfusion.atomic.atomic_folder``); a full
        disk raises ``DiskFullError`` and leaves an earlier folder there as it was."""
        with atomic_folder(save_directory, "save_pretrained folder", last=CONFIG) as tmp:
            super().save_pretrained(tmp, config=config, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, config=config,
                                    model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        self.configure_model()  # a network built lazily (TransfusionModule) is built now, so its weights are saved
        init_args = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # not LightningCLI's own
        for start in ("init_from", "text_model"):  # where training started: the saved weights supersede it
            if init_args.get(start):
                init_args[start] = None
        if "tokenizer" in init_args:  # self-contained: no paths to other files
            init_args["tokenizer"] = self.tokenizer.save(save_directory)  # its file name
        skip = ()  # prefixes of tensors saved elsewhere
        if hasattr(getattr(self, "autoencoder", None), "save_folder"):  # a diffusers VAE: in its own layout, vae/
            self.autoencoder.save_folder(save_directory / VAE)
            init_args["autoencoder"], skip = {**self.autoencoder.hparams, "path": VAE}, ("autoencoder.",)
        elif "autoencoder" in init_args:  # a checkpoint path (or settings): its settings; its weights are in ours
            init_args["autoencoder"] = {k: v for k, v in self.autoencoder.hparams.items() if not k.startswith("_")}
        class_path = f"{type(self).__module__}.{type(self).__qualname__}"
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith(skip)}
        save_file(state, save_directory / WEIGHTS, metadata={"format": "pt", "class_path": class_path})
        config = {"class_path": class_path, "init_args": init_args, "config": flatten_config(self.config),
                  "weights": getattr(self, "weights_source", "raw")}  # or the EMA's (transfusion.lightning.ema)
        (save_directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         config: dict | None = None, map_location: str | torch.device = "cpu"):
        def fetch(name: str) -> Path:
            """A file of the folder, or of the Hub repo (downloaded into the Hugging Face cache)."""
            if os.path.isdir(model_id):
                path = Path(model_id) / name
                if not path.is_file():
                    raise FileNotFoundError(f"{str(path)!r} does not exist; is {model_id!r} a folder written by "
                                            f"save_pretrained or `transfusion export`?")
                return path
            return Path(hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                        force_download=force_download, local_files_only=local_files_only))

        if config is None:  # ModelHubMixin found no config.json: say why
            config = json.loads(fetch(CONFIG).read_text())
        if not isinstance(config, dict) or not {"class_path", "init_args", "config"} <= set(config):
            raise UserError(f"the config.json of {model_id!r} was not written by transfusion's save_pretrained "
                             f"(no class_path, init_args and config)")
        saved = config["class_path"].rpartition(".")[2]
        if saved != cls.__name__:
            raise UserError(f"{model_id!r} holds a {saved} ({config['class_path']}), not a {cls.__name__}: "
                             f"load it with {saved}.from_pretrained")
        init_args = dict(config["init_args"])
        if "tokenizer" in init_args:  # tokenizer.model, or tokenizer.json with tokenizer_config.json beside it
            if init_args["tokenizer"] == HUGGING_FACE:
                fetch(HF_CONFIG)
            init_args["tokenizer"] = str(fetch(init_args["tokenizer"]))
        vae = isinstance(init_args.get("autoencoder"), dict) and init_args["autoencoder"].get("path") == VAE
        if vae:  # the diffusers folder beside ours (fetched file by file from a Hub repo)
            from transfusion.models.diffusers_vae import CONFIG as VAE_CONFIG, WEIGHTS as VAE_WEIGHTS

            folder = fetch(f"{VAE}/{VAE_CONFIG}").parent
            fetch(f"{VAE}/{VAE_WEIGHTS}")
            init_args["autoencoder"] = {**init_args["autoencoder"], "path": str(folder)}
        module = cls(**init_args)
        check_config(config["config"], module.config, f"the model in {model_id!r}")
        module.configure_model()  # modules that build their network lazily (TransfusionModule) build it now
        missing, unexpected = module.load_state_dict(load_file(fetch(WEIGHTS)), strict=False)
        missing = [k for k in missing if not (vae and k.startswith("autoencoder."))]  # loaded from vae/
        if missing or unexpected:
            raise UserError(f"the weights of {model_id!r} do not fit {cls.__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        module.weights_source = config.get("weights", "raw")  # an EMA's, if saved so (transfusion.lightning.ema)
        return module.to(map_location).eval()

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return super().generate_model_card(*args, class_name=type(self).__name__, module=type(self).__module__,
                                           **kwargs)
