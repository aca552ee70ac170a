"""Sources: where real data comes from, read through Hugging Face ``datasets`` and checked once.

The sources a YAML file names by ``class_path`` (``transfusion.data.sources.ImageFolderSource``) are importable
from here; ``pairs.py`` checks and decodes image-caption rows, ``loading.py`` reads files and Hub datasets.
"""

from transfusion.data import moved
from transfusion.data.sources.edits import EditFilesSource, EditFolderSource, EditSource  # noqa: F401
from transfusion.data.sources.image_caption import (CocoSource, FilesSource, HubSource,  # noqa: F401
                                                    ImageCaptionSource, ImageFolderSource)
from transfusion.data.sources.text import HubTextSource, TextFilesSource, TextSource  # noqa: F401

__getattr__ = moved.renamed_names(__name__)  # names of the earlier sources.py: load_files, read_metadata, ...
