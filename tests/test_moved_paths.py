"""The data package's paths before its layout in folders (``transfusion/data/moved.py``): YAML class paths, imports,
checkpoints' ``_class_path`` and pickles naming them still load, with a FutureWarning naming the new path; nothing
in the repository still uses them."""

import ast
import importlib
import pickle
import re
import subprocess
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from transfusion.cli import cli_main
from transfusion.data import moved

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_configs"
# every transfusion.data class path in the YAML files of d42657a (the last commit before the layout), its new path
# and a shipped YAML that names it now
OLD_CLASS_PATHS = {
    "transfusion.data.datamodule.TransfusionDataModule":
        ("transfusion.data.modules.embedded.TransfusionDataModule", "transfusion_embedded.yaml"),
    "transfusion.data.images.ImageDataModule": ("transfusion.data.modules.image.ImageDataModule",
                                                "autoencoder_embedded.yaml"),
    "transfusion.data.image_text.ImageTextDataModule": ("transfusion.data.modules.image_text.ImageTextDataModule",
                                                        "transfusion_real_cpu.yaml"),
    "transfusion.data.edit_datamodule.EditDataModule": ("transfusion.data.modules.edit.EditDataModule",
                                                        "edit_embedded.yaml"),
    "transfusion.data.story_datamodule.StoryDataModule": ("transfusion.data.modules.story.StoryDataModule",
                                                          "story_embedded.yaml"),
    "transfusion.data.geneval_prompts.GenEvalPrompts": ("transfusion.data.modules.geneval.GenEvalPrompts",
                                                        "geneval_predict.yaml"),
    "transfusion.data.shards.StreamingDataModule": ("transfusion.data.modules.streaming.StreamingDataModule",
                                                    "transfusion_streamed_embedded.yaml"),
}
UNCHANGED = ("transfusion.data.sources.ImageFolderSource", "transfusion.data.sources.TextFilesSource")


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _old_data_section(old: str) -> dict:
    """The ``data`` section of the shipped YAML that names ``old``'s class, with the old class path put back."""
    new, config = OLD_CLASS_PATHS[old]
    data = yaml.safe_load((CONFIGS / config).read_text())["data"]
    assert data["class_path"] == new, config
    return {**data, "class_path": old}


def test_every_old_class_path_resolves_through_jsonargparse_with_a_warning():
    # the parser LightningCLI builds for its `data` key (subclass mode); the shipped YAMLs' data sections
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    for old, (new, _) in OLD_CLASS_PATHS.items():
        with pytest.warns(FutureWarning, match=re.escape(f"{old} has moved to {new}")):
            config = parser.parse_object({"data": _old_data_section(old)})
            assert _resolve(config.data.class_path) is _resolve(new)  # the class now at the new path
    for path in UNCHANGED:  # the sources package keeps its names
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            module, _, name = path.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name), type)


@pytest.mark.slow  # ~2 s quiet, 4.4 s loaded: LightningCLI builds its whole parser
def test_a_yaml_with_an_old_class_path_runs_through_the_cli(tmp_path, capsys):
    old = "transfusion.data.datamodule.TransfusionDataModule"
    config = yaml.safe_load((CONFIGS / "transfusion_embedded.yaml").read_text())
    config["data"] = _old_data_section(old)
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    with pytest.warns(FutureWarning, match="transfusion.data.modules.embedded.TransfusionDataModule"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(tmp_path / "old.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["data"]  # the config LightningCLI saves beside the run
    assert printed["class_path"] == old and printed["init_args"]["seq_len"] == config["data"]["init_args"]["seq_len"]


def test_a_checkpoint_naming_the_old_class_path_loads(tmp_path):
    # what LightningCLI writes into a checkpoint for its data module: the class path, the instantiator, the arguments,
    # and the data position under the class name
    checkpoint = {"pytorch-lightning_version": L.__version__,
                  "datamodule_hyper_parameters": {"_class_path": "transfusion.data.datamodule.TransfusionDataModule",
                                                  "_instantiator": "lightning.pytorch.cli.instantiate_module",
                                                  "seq_len": 64, "batch_size": 2, "images": "scenes"},
                  "TransfusionDataModule": {"epoch": 1, "rows": 8}}
    torch.save(checkpoint, tmp_path / "data.ckpt")
    with pytest.warns(FutureWarning, match="has moved to transfusion.data.modules.embedded.TransfusionDataModule"):
        data = L.LightningDataModule.load_from_checkpoint(tmp_path / "data.ckpt")
    assert type(data).__module__ == "transfusion.data.modules.embedded"
    assert (data.hparams.seq_len, data.hparams.batch_size, data.hparams.images) == (64, 2, "scenes")
    assert data._resume_from == {"epoch": 1, "rows": 8}  # training would resume at the same row


def test_old_module_paths_serve_every_name_with_a_warning_naming_its_home():
    # pickles name classes by module path (GLOBAL opcode): an old module and an old name of the sources package
    from transfusion.data.embedded.shapes import ShapeAttributes
    from transfusion.data.sources.loading import load_files

    with pytest.warns(FutureWarning, match="transfusion.data.shapes.ShapeAttributes has moved to "
                                           "transfusion.data.embedded.shapes.ShapeAttributes"):
        assert pickle.loads(b"ctransfusion.data.shapes\nShapeAttributes\n.") is ShapeAttributes
    with pytest.warns(FutureWarning, match="transfusion.data.sources.load_files has moved to "
                                           "transfusion.data.sources.loading.load_files"):
        from transfusion.data.sources import load_files as old_load_files
    assert old_load_files is load_files
    for old, homes in moved.MOVED.items():  # every name the new modules define, through each old path
        module = importlib.import_module(old)
        for home in homes:
            tree = ast.parse(Path(importlib.import_module(home).__file__).read_text())
            names = [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))] + \
                [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
            for name in moved.SERVED.get(old, names):
                if old in moved.SERVED and not hasattr(importlib.import_module(home), name):
                    continue  # a served name of another of the package's new modules
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    assert getattr(module, name) is getattr(importlib.import_module(home), name), (old, name)
                assert [str(w.message).split(" has moved to ")[0] for w in caught] == [f"{old}.{name}"]
    with pytest.raises(AttributeError, match="module 'transfusion.data.datamodule' has no attribute 'Nothing'"):
        importlib.import_module("transfusion.data.datamodule").Nothing


def test_nothing_in_the_repository_uses_an_old_path():
    old = [m for m in moved.MOVED if m not in moved.SERVED]
    short = [m.rpartition(".")[2] for m in old]
    alternatives = [r"\b(%s)\b" % "|".join(map(re.escape, old)),  # modules, dotted or imported
                    r"transfusion/data/(%s)\.py" % "|".join(short),  # file paths in the docs
                    r"from transfusion\.data import .*\b(%s)\b" % "|".join(short)]
    for package, names in moved.SERVED.items():  # old names of the packages that stay
        alternatives += [r"%s\.(%s)\b" % (re.escape(package), "|".join(names)),
                         r"from %s import .*\b(%s)\b" % (re.escape(package), "|".join(names))]
    pattern = re.compile("|".join(alternatives))
    files = subprocess.run(["git", "ls-files", "transfusion", "tests", "bench", "data", "notebooks", "docs",
                            "lightning_configs", "README.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    skip = {"transfusion/data/moved.py", "tests/test_moved_paths.py",
            "tests/data/legacy/make_legacy.py"}  # runs against the code of 7a332c2, which has the old paths
    found = [f"{f}:{i}: {line.strip()}" for f in files if f not in skip and f.endswith((".py", ".md", ".yaml", ".ipynb"))
             for i, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not found, "old data paths (see transfusion/data/moved.py):\n" + "\n".join(found)
