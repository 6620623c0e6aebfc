import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """One demo corpus + tokenizer for the whole session (building it trains a SentencePiece model)."""
    return tmp_path_factory.mktemp("demo_cache")
