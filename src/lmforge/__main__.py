"""`python -m lmforge <stage> ...`: the same as the `lmforge` command."""

from lmforge.cli import main

raise SystemExit(main())
