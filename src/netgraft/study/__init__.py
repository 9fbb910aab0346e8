"""How many layers to reuse: run the transfer experiment for the user and show the answer.

:func:`study` copies the first ``k`` units (blocks by default, or layers) of a trained source
model, re-initialises the rest, trains on the target data with the copied units frozen
(``"frozen"``) or trainable (``"fine-tuned"``) — or keeps every unit and tunes only unit ``k``
(``"surgical"``, Lee et al. 2023, "Surgical fine-tuning improves adaptation to distribution
shifts"), or keeps every weight frozen and trains LoRA adapters (through PEFT) on the top
``k`` blocks of the main stack (``"lora"``, :mod:`.lora`) — and records validation accuracy
(mean and std over seeds), the number of trained parameters and the time, for every ``k``
asked for. A from-scratch baseline (``k = 0``) and a *selffer* control (a model trained on
the target task itself, reused the same way; Yosinski et al. 2014, "How transferable are
features in deep neural networks?") put the numbers in context. Results: a rich table,
JSON, CSV, a PNG of accuracy against ``k`` per mode, and a recommended ``k``.

At scale: the frozen trials share one forward pass of the source model over the target data
(and the seeds of a lora ``k`` its frozen bottom; :mod:`.shared`), trials run in local
processes or as Ray tasks (:mod:`.runners`) with the same numbers as one after another, and
with ``out_dir`` a killed study resumes where it stopped (:mod:`.resume`). One trial is
:mod:`.trials`; the steps are :mod:`.core`; the rows, table and plot are :mod:`.result`.

Example::

    >>> result = netgraft.study(source, (x_train, y_train), (x_val, y_val), seeds=3, budget=5,
    ...                         workers=2, out_dir="study-out")
    >>> result.recommended
    {'model': 'source', 'mode': 'frozen', 'k': 2, ...}

This package never changes the source or control model (every run trains a copy) and writes
only into the output (or cache) folder it is given.
"""

from .core import BACKENDS, study
from .result import StudyResult
from .trials import MODES, STUDY_MODES

__all__ = ["BACKENDS", "MODES", "STUDY_MODES", "StudyResult", "study"]
