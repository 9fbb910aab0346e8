"""netgraft inside the trainers people already use.

:mod:`netgraft.integrations.lightning` (``FineTune``, a Lightning callback) and
:mod:`netgraft.integrations.hf` (``FineTuneCallback`` and an optimizer factory for the
Hugging Face ``Trainer``) run :func:`netgraft.fine_tune`'s schedule inside those trainers;
each needs its extra (``pip install 'netgraft[lightning]'`` / ``'netgraft[hf]'``) and is
imported on its own. What needs no trainer lives here: :func:`cached_head` (head-only
training on cached features) and :class:`FineTuneSchedule`, the stage driver both
callbacks share.
"""

from .cached import CachedHead, cached_head
from .extras import MissingExtraError
from .schedule import FineTuneSchedule

__all__ = ["CachedHead", "FineTuneSchedule", "MissingExtraError", "cached_head"]
