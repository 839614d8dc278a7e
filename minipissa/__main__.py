"""python -m minipissa: the command line (minipissa.interop.cli)."""

import sys

from .interop.cli import main

sys.exit(main())
