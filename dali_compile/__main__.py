"""`python -m dali_compile run|bench ...`: the command line (dali_compile/cli)."""

import sys

from dali_compile.cli import main

sys.exit(main())
