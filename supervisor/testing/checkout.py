"""Where the test server and the examples are: in the source checkout this package was installed from.

The tests and benchmarks run from a checkout with an editable install (`make install`), so these paths are next
to the package; a wheel installed elsewhere has no test server to point at.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUB = str(ROOT / "tests" / "servers" / "stub.py")
APP = str(ROOT / "examples" / "app.py")
PYTHON = sys.executable
