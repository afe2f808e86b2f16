"""``python -m train`` = ``iwm-train`` (also ``torchrun ... -m train``)."""

import sys

from train.cli import main

sys.exit(main())
