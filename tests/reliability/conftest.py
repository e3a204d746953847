"""The reliability suite shares the API tests' helpers (tests/api_server.py, tests/tiny_models.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
