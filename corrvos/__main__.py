"""``python -m corrvos``: the same as the ``corrvos`` command."""
import sys

from corrvos.cli import main

sys.exit(main())
