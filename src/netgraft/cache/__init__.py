"""Cache what frozen layers compute, so training runs only the layers above them.

When the lower layers of a model are frozen their outputs never change, so computing them
again every epoch is waste. :class:`FeatureCache` runs a frozen *prefix* once over a
dataset (eval mode, no gradients) and is itself a dataset of ``(features, label)`` pairs,
in memory or on disk in memory-mapped ``.npy`` shards. An on-disk cache lives in a folder
named after its *key* (:mod:`.key`), a hash of everything its contents depend on: the
prefix's weights and buffers, its structure and cut point, the data (tensor contents, or
file paths, sizes and modification times) and the transforms. A valid cache is reused;
one built for other weights or data has another key and is never read; a corrupt one
(shard checksums in its manifest, :mod:`.store`) is rebuilt. Builders write into a
temporary folder and rename it into place under a file lock, so two processes building
the same cache end with one valid cache.

A random data pipeline (``RandomResizedCrop``, ``ColorJitter``, ..., :mod:`.transforms`)
would be frozen into one augmentation, so it is refused unless ``augment_copies=K``, which
caches K augmented passes (epoch ``e`` reads pass ``e % K``; call
:meth:`FeatureCache.set_epoch`).

Where to cut a model for training from cached features is a training decision:
:func:`netgraft.train.cached.plan`, which ``fit``/``fine_tune`` call.

Example::

    >>> prefix, head = netgraft.cut(model, after="avgpool")
    >>> feats = netgraft.FeatureCache(prefix, train_set, cache_dir="~/.cache/netgraft")
    >>> loader = torch.utils.data.DataLoader(feats, batch_size=64, shuffle=True)

This package never changes a model's weights, never leaves its train/eval modes changed,
never reads a cache whose key differs from the one it computed, and never imports the
training code.
"""

from .features import FeatureCache
from .key import cache_key
from .transforms import random_transforms

__all__ = ["FeatureCache", "cache_key", "random_transforms"]
