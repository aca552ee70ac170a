"""Import paths of the data package before its layout in folders: they still work, with a ``FutureWarning`` naming
the new path, because YAML files, LightningCLI's saved ``config.yaml`` and checkpoints' ``_class_path`` name them
(``transfusion.data.datamodule.TransfusionDataModule`` is now
``transfusion.data.modules.embedded.TransfusionDataModule``).

``import transfusion.data`` puts an empty module at each old path of ``MOVED`` into ``sys.modules`` (no file is left
there; Lightning loads a checkpoint's ``_class_path`` only from a module already imported): a name read from it comes
from the first of its new modules that has it. A package that stays (``transfusion.data.sources``,
``transfusion.data.shards``) serves its old names the same way.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings

MOVED = {  # old module -> the modules its names went to, searched in order
    "transfusion.data.datamodule": ("transfusion.data.modules.base", "transfusion.data.modules.embedded"),
    "transfusion.data.resumable": ("transfusion.data.modules.resumable",),
    "transfusion.data.image_text": ("transfusion.data.modules.image_text",),
    "transfusion.data.edit_datamodule": ("transfusion.data.modules.edit",),
    "transfusion.data.story_datamodule": ("transfusion.data.modules.story",),
    "transfusion.data.images": ("transfusion.data.modules.image",),
    "transfusion.data.shards.datamodule": ("transfusion.data.modules.streaming",),
    "transfusion.data.geneval_prompts": ("transfusion.data.rows.geneval_prompts", "transfusion.data.modules.geneval"),
    "transfusion.data.sequences": ("transfusion.data.rows.sequences",),
    "transfusion.data.documents": ("transfusion.data.rows.documents",),
    "transfusion.data.edits": ("transfusion.data.rows.edits",),
    "transfusion.data.prompts": ("transfusion.data.rows.prompts",),
    "transfusion.data.text": ("transfusion.data.embedded.text", "transfusion.data.rows.tokens"),
    "transfusion.data.shapes": ("transfusion.data.embedded.shapes",),
    "transfusion.data.scenes": ("transfusion.data.embedded.scenes",),
    "transfusion.data.shape_edits": ("transfusion.data.embedded.shape_edits",),
    "transfusion.data.stories": ("transfusion.data.embedded.stories",),
    "transfusion.data.edit_sources": ("transfusion.data.sources.edits",),
    "transfusion.data.pairs": ("transfusion.data.sources.pairs",),
    "transfusion.data.latent_cache": ("transfusion.data.sources.latent_cache",),
    # packages that stay, for their old names (sources.py became the sources/ package)
    "transfusion.data.sources": ("transfusion.data.sources.loading", "transfusion.data.sources.image_caption",
                                 "transfusion.data.sources.text"),
    "transfusion.data.shards": ("transfusion.data.modules.streaming",),
}
SERVED = {  # the old names a package that stays still serves (its own attributes are not redirected)
    "transfusion.data.sources": ("VAL_SPLITS", "hub_check", "split_folder", "load_files", "load_dataset",
                                 "read_metadata", "check_text_file", "utf8_copy"),
    "transfusion.data.shards": ("StreamingDataModule",),
}


def renamed_names(old: str):
    """A module ``__getattr__`` serving the names of ``old`` from its new modules, with a ``FutureWarning``."""

    def __getattr__(name: str):
        if not name.startswith("__") and name in SERVED.get(old, (name,)):
            for new in MOVED[old]:
                module = importlib.import_module(new)
                if hasattr(module, name):
                    value = getattr(module, name)
                    home = getattr(value, "__module__", None) or new
                    home = home if home.startswith("transfusion.") else new
                    warnings.warn(f"{old}.{name} has moved to {home}.{name}: the old path will be removed; "
                                  f"write the new one in imports and YAML class_path", FutureWarning, stacklevel=2)
                    return value
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__


def install() -> None:
    """Put the old modules into ``sys.modules`` (their names are looked up on first use)."""
    for old, new in MOVED.items():
        if old not in SERVED and old not in sys.modules:
            module = types.ModuleType(old, f"Moved to {', '.join(new)} (an old path: see transfusion.data.moved).")
            module.__spec__ = importlib.machinery.ModuleSpec(old, None)
            module.__getattr__ = renamed_names(old)
            sys.modules[old] = module
