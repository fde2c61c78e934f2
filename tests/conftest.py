"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def saved_bytes():
    """``saved_bytes(fn, *args)``: the bytes autograd keeps for backward while ``fn(*args)`` runs."""
    def measure(fn, *args) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn(*args)
        return sum(sizes)
    return measure
