import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A torchrun launch costs seconds before the first step, so every `multiprocess` test is also `slow`."""
    for item in items:
        if item.get_closest_marker("multiprocess") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """One demo corpus + tokenizer for the whole session (building it trains a SentencePiece model)."""
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="session")
def llama3_path() -> Path:
    """Meta's Llama 3 tokenizer.model, shipped in the llama-models package (dev extra)."""
    llama_models = pytest.importorskip("llama_models", reason="llama-models (dev extra) is not installed")
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


@pytest.fixture(scope="session")
def llama3_hf_tokenizer(llama3_path: Path):
    """Meta's Llama 3 tokenizer as a transformers fast tokenizer, converted once per session."""
    from hf_models import llama3_fast_tokenizer

    return llama3_fast_tokenizer(llama3_path)
