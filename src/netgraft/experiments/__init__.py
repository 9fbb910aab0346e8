"""Seeded experiments built on netgraft: the demo (:mod:`netgraft.experiments.demo`, what
``netgraft demo`` and ``make demo`` run) and the results helper it shares with
:func:`netgraft.study` (:mod:`netgraft.experiments.results`).

Importing this package imports none of its modules, so the core library can use the results
helper without loading the demo. Nothing here is part of ``netgraft.__all__``.
"""
