"""`python -m pyublk_fast`: the command line (see pyublk_fast.cli)."""
import sys

from pyublk_fast.cli import main

sys.exit(main())
