"""Import paths of the data package before its layout in folders: they still work, with a ``FutureWarning`` naming
the new path, because YAML files, LightningCLI's saved ``config.yaml`` and checkpoints' ``_class_path`` name them
(``transfusion.data.datamodule.TransfusionDataModule`` is now
``transfusion.data.modules.embedded.TransfusionDataModule``).

An old module is made on import from ``MOVED`` by a finder (no file is left at the old path): a name read from it
comes from the first of its new modules that has it. ``renamed_names`` does the same for the old names of a package
that still exists (``transfusion.data.sources``, ``transfusion.data.shards``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
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


class _OldModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old modules of ``MOVED`` that have no file any more and makes each one on import."""

    def find_spec(self, fullname, path=None, target=None):
        # last in sys.meta_path: asked only when no file is found (a package that stays serves its old names itself)
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return None  # a plain module

    def exec_module(self, module) -> None:
        module.__doc__ = f"Moved to {', '.join(MOVED[module.__name__])} (an old path, see transfusion.data.moved)."
        module.__getattr__ = renamed_names(module.__name__)


def install() -> None:
    """Make the old module paths importable (once per process)."""
    if not any(isinstance(finder, _OldModules) for finder in sys.meta_path):
        sys.meta_path.append(_OldModules())
