"""`python -m d2sd` is `python -m d2sd.run`."""

import sys

from d2sd.run import main

sys.exit(main())
