import pytest

from repair_pl.testing import char_tokenizer, tiny_llama


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_model():
    return tiny_llama()
