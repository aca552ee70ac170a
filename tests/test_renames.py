"""Names unified since a format was written still load: a Chameleon ``save_pretrained`` folder whose config says
``image_tokens`` (now ``patches_per_image``) reloads the same module, and a changed value is still refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from transfusion.lightning.checkpoint import check_config, flatten_config
from transfusion.models.chameleon import ChameleonConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _as_before(config: dict) -> dict:
    """A flattened ChameleonConfig as the code before the rename wrote it."""
    return {("image_tokens" if k == "patches_per_image" else k): v for k, v in config.items()}


def test_check_config_reads_the_old_name():
    config = ChameleonConfig(patches_per_image=16)
    check_config(_as_before(flatten_config(config)), config, "this checkpoint")
    with pytest.raises(ValueError, match="patches_per_image: checkpoint 64 != config 16"):
        check_config(_as_before(flatten_config(ChameleonConfig())), config, "this checkpoint")


def test_a_chameleon_folder_saved_with_the_old_name_loads(tokenizer_path, vq_ckpt, tmp_path):
    from transfusion.lightning.chameleon import ChameleonModule

    torch.manual_seed(0)
    module = ChameleonModule(tokenizer_path, vq_ckpt, preset="debug").eval()
    module.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    assert saved["config"]["patches_per_image"] == module.config.patches_per_image
    path.write_text(json.dumps({**saved, "config": _as_before(saved["config"])}))
    loaded = ChameleonModule.from_pretrained(tmp_path)
    assert loaded.config == module.config and loaded.patches_per_image == module.patches_per_image
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
