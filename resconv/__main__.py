"""``python -m resconv`` = the ``resconv`` command."""
import sys

from .cli import main

sys.exit(main())
