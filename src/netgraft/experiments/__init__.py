"""Deprecated home of the demo, the results helpers and the small reference models.

They moved: :mod:`netgraft.demo`, :mod:`netgraft.results`, :mod:`netgraft.models`; the
auxiliary and surgical experiments are benchmark code under ``bench/``. The old module paths
still import (with a FutureWarning) so code written against them keeps running.
"""
