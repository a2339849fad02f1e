"""``python -m chaos``: see :mod:`chaos.run`."""

from chaos.run import main

raise SystemExit(main())
