import pytest
import torch

from repair_pl.testing import char_tokenizer, tiny_llama


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny-model tests: faster and free of thread scheduling noise)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
