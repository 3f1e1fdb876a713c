"""`python -m minihuatuo ...` works like the `minihuatuo` console script."""
import sys

from minihuatuo.cli import main

sys.exit(main())
