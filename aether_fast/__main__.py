"""`python -m aether_fast ...` is `aether-fast ...`."""

from aether_fast.cli import main

raise SystemExit(main())
