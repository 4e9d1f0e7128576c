"""``python -m hamilton_attn`` is the ``hamilton-attn`` command."""

import sys

from .cli import main

sys.exit(main())
