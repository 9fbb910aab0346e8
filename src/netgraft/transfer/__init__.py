"""Weight transfer between architectures and frameworks, with a full report.

``netgraft.transfer(src, dst)`` copies every tensor that fits (mapping, names, structure),
handles shape mismatches by policy, and returns a :class:`TransferReport` with the status of
every destination tensor. Sources: modules, state dicts, ``.safetensors``/``.pt`` files,
Keras ``.h5``/``.keras`` (read with h5py, never TensorFlow) and ``.onnx`` files.
"""

from .core import load_source, transfer
from .report import TransferReport

__all__ = ["TransferReport", "load_source", "transfer"]
