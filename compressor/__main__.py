"""`python -m compressor ...` (and `accelerate launch -m compressor run ...`)."""

import sys

from .cli import main

sys.exit(main())
