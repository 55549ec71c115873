"""``python -m ferrovlm``: the ``ferrovlm`` command."""

from .cli import main

raise SystemExit(main())
