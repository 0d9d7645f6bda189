import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_token_cache(tmp_path_factory, monkeypatch):
    """Fine-tuning's shared token cache goes to a test folder, never the
    user's ~/.cache."""
    monkeypatch.setenv("MHA2MLA_CACHE", str(tmp_path_factory.mktemp("mha2mla_cache")))
