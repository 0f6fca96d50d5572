from __future__ import annotations

import pytest
import torch

# the models under test are tiny: one thread is as fast and never fights a neighbour for the cores
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_dataset():
    """A small generated corpus tokenized with the shipped tokenizer (shared by the tests)."""
    from workbench.data import TokenDataset, generate_corpus
    from workbench.io.tokenizer import load_tokenizer

    return TokenDataset.from_documents(generate_corpus(600, seed=3), load_tokenizer(), seed=3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU box)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
