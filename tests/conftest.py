import os
import sys
from pathlib import Path

import pytest
import torch

from titanlm.data import ensure_demo_assets

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread, here and in the processes tests start: the suite's models are so small that a
    second thread saves little, and where another process holds a core, every op of a two-thread team waits
    for it (a 5-step tiny run took 12 s instead of 1 s on a busy 2-core machine)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
def demo_tokenizer(demo_cache: Path) -> str:
    """The path of the session's demo SentencePiece model."""
    return ensure_demo_assets(str(demo_cache)).tokenizer_path


def _dev_extra_file(package: str, relative: str) -> Path:
    module = pytest.importorskip(package, reason=f"{package} (dev extra) is not installed")
    return Path(module.__file__).parent / relative


@pytest.fixture(scope="session")
def llama3_path() -> Path:
    """Meta's Llama 3 tokenizer.model, shipped in the llama-models package (dev extra)."""
    return _dev_extra_file("llama_models", "llama3/tokenizer.model")


@pytest.fixture(scope="session")
def mistral_path() -> Path:
    """Mistral's first SentencePiece model (Llama 2's layout), shipped in the mistral-common package (dev extra)."""
    return _dev_extra_file("mistral_common", "data/tokenizer.model.v1")


@pytest.fixture(scope="session")
def llama3_hf_tokenizer(llama3_path: Path):
    """Meta's Llama 3 tokenizer as a transformers fast tokenizer, converted once per session."""
    from hf_models import llama3_fast_tokenizer

    return llama3_fast_tokenizer(llama3_path)
