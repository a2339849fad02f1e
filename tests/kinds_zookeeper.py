"""Lock-store kinds for the contract suite (a pytest plugin loaded by tests/conftest.py).

``KINDS`` lists the kind ids this module adds; for each id a session fixture
``_store_<id>`` yields the URL value to open the store with.
"""

from __future__ import annotations

KINDS: list[str] = []
