"""``python -m bench.task``: see :mod:`bench.task`."""

from bench.task import main

if __name__ == "__main__":
    raise SystemExit(main())
