"""Keep the host's pytest away from the dom0-only guest tests.

``tests/xen/guest/`` runs inside dom0 only (``tests/xen/run.py``); the host
collects the harness's own unit tests (``test_harness.py``) only.
"""

collect_ignore = ["guest", "image", "run.py"]
