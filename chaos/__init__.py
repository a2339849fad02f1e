"""A bounded chaos run for celery-singleton-lock: ``python -m chaos --help``.

Real workers run thousands of locked tasks while faults are injected at random from a seed;
an external checker then reads what the task bodies recorded (outside the lock store) and
reports overlaps, fencing tokens that did not grow, lost or repeated tasks, locks left behind
and how long a lock outlived its holder. See the "Chaos run" section of the README.

* :mod:`chaos.run` drives one run (servers, proxies, workers, tasks, faults, the report);
* :mod:`chaos.app` is the Celery app the workers load;
* :mod:`chaos.records` writes and reads the append-only record files;
* :mod:`chaos.checker` turns records into findings (pure, no I/O);
* :mod:`chaos.proxy` is the TCP proxy that adds latency or a partition to one master;
* :mod:`chaos.stores` starts the lock stores (Redlock, one Redis, a cluster);
* :mod:`chaos.faults` injects the faults.
"""
