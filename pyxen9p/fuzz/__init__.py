"""A fuzzer for Xen 9pfs *backends*: pyxen9p as the hostile frontend.

See ``docs/fuzz-backend.rst`` and ``pyxen9p fuzz-backend --help``.  The parts:

* :mod:`pyxen9p.fuzz.case` -- cases (JSON steps) and findings;
* :mod:`pyxen9p.fuzz.generate` -- one generator per layer, reproducible from
  ``(seed, case number)``;
* :mod:`pyxen9p.fuzz.raw` -- the raw frontend (no safety rules, kept apart
  from :mod:`pyxen9p.frontend`);
* :mod:`pyxen9p.fuzz.execute` -- running a case with the oracles watching;
* :mod:`pyxen9p.fuzz.target` and :mod:`pyxen9p.fuzz.dom0` -- what is attacked
  (the simulated backend, with deliberate faults if asked; a backend in dom0;
  one existing device);
* :mod:`pyxen9p.fuzz.shrink` -- delta debugging over a case's steps;
* :mod:`pyxen9p.fuzz.repro` -- standalone reproducer scripts;
* :mod:`pyxen9p.fuzz.campaign` -- a whole run.
"""
