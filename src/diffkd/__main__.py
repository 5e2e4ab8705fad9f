"""`python -m diffkd` (and `torchrun ... -m diffkd`) runs the `diffkd` command."""

from .cli import main

raise SystemExit(main())
