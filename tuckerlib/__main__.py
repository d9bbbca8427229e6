"""``python -m tuckerlib``: the same as the ``tuckerlib`` command."""

from tuckerlib.cli import main

raise SystemExit(main())
