"""Lock stores: the interface every store implements, and the stores picked by URL scheme.

``LockBackend`` (a whole store), ``QuorumMember`` (one server that ``Quorum`` combines by the
Redlock rules) and ``Capability`` are in :mod:`.base`; :mod:`.registry` finds a store class by
URL scheme in the ``celery_singleton_lock.backends`` entry-point group.
"""

from .base import Capability, LockBackend, QuorumMember

__all__ = ["Capability", "LockBackend", "QuorumMember"]
