"""``python -m ciphertwin …`` — the same as the ``ciphertwin`` command."""

from ciphertwin.cli import main

raise SystemExit(main())
