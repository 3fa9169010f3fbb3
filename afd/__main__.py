from __future__ import annotations

import sys

from afd.entrypoints.cli import main

sys.exit(main())
