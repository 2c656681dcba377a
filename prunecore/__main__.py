"""`python -m prunecore`: the same as the `prunecore` command."""

from prunecore.cli import main

raise SystemExit(main())
