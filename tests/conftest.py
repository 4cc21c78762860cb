"""Makes the suite's helper modules (such as logstore_conformance) importable from tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
