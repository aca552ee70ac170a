"""Data: where it comes from, how it becomes rows, and the DataModules that serve them.

* ``embedded/``: the data that ships with the package (shapes, scenes, edits, stories, the news text);
* ``sources/``: real data read through Hugging Face ``datasets`` (image-caption, text and edit sources, checked
  pairs, the latent cache);
* ``rows/``: examples and documents made into training rows, and ``predict`` prompts;
* ``modules/``: the LightningDataModules (``transfusion fit --data ...``);
* ``shards/``: the shard format, its writer and streamed reader;
* ``tokenizer.py``, ``preprocess.py``: the tokenizer and the image / caption checks every part uses.

Paths of the earlier flat layout still import, with a FutureWarning (``moved.py``).
"""

from transfusion._torchvision_compat import ensure_torchvision_importable
from transfusion.data import moved

ensure_torchvision_importable()  # this package imports lightning / torchmetrics / torchvision
moved.install()  # the earlier paths (YAML class_path, saved configs, checkpoints name them)
