"""The worker's machinery: what runs in a Celery worker beside LockedTask.

* :mod:`.receivers`: the signal receivers (worker start and stop, pool children, task
  endings, the store check at start, password-free ``conf``);
* :mod:`.board`: shared memory where prefork children post the locks they hold;
* :mod:`.supervisor`: the main process thread that reads the board, renews its children's
  locks and releases those of a child that was killed or timed out;
* :mod:`.bootstep`: ``inspect stats`` and the worker's own lock listing;
* :mod:`.control`: Celery's ``conf`` and ``revoke`` control commands as such a worker answers.
"""
