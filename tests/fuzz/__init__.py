"""Fuzzing at scale: the hostile backend, the 9P codec and the file server.

``scripts/fuzz`` runs every target with many cases in worker processes
(:mod:`fuzz.runner`); ``tests/fuzz/test_fuzz_slice.py`` runs a bounded slice of
each in the normal test suite.  Each target is a module with a ``Worker``
class whose ``case(rng)`` plays one case drawn from a seeded
:class:`random.Random` and raises :class:`AssertionError` for a finding.  See
``docs/testing.rst``.
"""
