from __future__ import annotations

import sys

from afd.cli import main

sys.exit(main())
