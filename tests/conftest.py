"""Shared fixtures: tiny random models made locally (no hub access)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Random Qwen3 target (vocab 64) with a random, unrelated Qwen3-Next-layout MTP head."""
    from bebop_spec.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", vocab_size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """Random Qwen3 target with a tiny byte-level BPE tokenizer and chat template, plus MTP."""
    from bebop_spec.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tinytext") / "m", with_tokenizer=True, seed=3)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP contention on shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
