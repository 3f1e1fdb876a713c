"""`python -m minihuatuo ...` works like the `minihuatuo` console script."""
import sys

from .cli import main

sys.exit(main())
