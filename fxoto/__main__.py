"""``python -m fxoto``, as ``torchrun --nproc-per-node N -m fxoto search ...`` starts it."""

import sys

from fxoto.cli import main

sys.exit(main())
