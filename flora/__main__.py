"""``python -m flora``: the same as the ``flora`` command."""

from flora.cli import main

raise SystemExit(main())
