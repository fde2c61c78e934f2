"""Fidelity in every clone: FAT-B0..B3 (at 224) and a small odd configuration (at odd sizes) reproduce
the logits of the authors' code (qhfan/FAT), from compact vectors that ship with the tests.

``data/fat_seeded_vectors.json`` holds, per case, the authors' constructor arguments and state-dict key
layout, a seed and a rule that rebuild the weights (stated in the file), input seeds and shapes, and
the authors' logits. The variants are built from our registry (``timm.create_model``), so the variant
table is what is checked, and the weights go through ``checkpoint_filter_fn`` as an authors' checkpoint
does.
"""
import pytest
import timm
import torch

from helpers import CASES, VECTORS, authors_state_dict
import models
from models.fat import FAT, checkpoint_filter_fn


def build(case: dict) -> FAT:
    if case['name'] in models.MODEL_ARGS:
        model = timm.create_model(case['name'], num_classes=case['authors_args']['num_classes'])
    else:
        model = FAT(**case['authors_args'])
    return model.eval()


def test_the_rule_is_the_files():
    """The weight rule of helpers.authors_state_dict is the one the file states (a changed file must
    change this test)."""
    assert VECTORS['rule'].startswith("g = torch.Generator().manual_seed(weight_seed); for (key, shape) in keys")
    assert set(CASES) == {'fat_b0', 'fat_b1', 'fat_b2', 'fat_b3', 'small'}


@pytest.mark.parametrize('name', list(CASES))
def test_authors_key_layout_maps_onto_ours_shape_for_shape(name):
    case = CASES[name]
    mapped = checkpoint_filter_fn({key: torch.empty(shape) for key, shape in case['keys']})
    ours = build(case).state_dict()
    assert set(mapped) == set(ours)
    assert all(mapped[key].shape == ours[key].shape for key in ours)


@pytest.mark.parametrize('name', list(CASES))
def test_logits_match_the_authors(name):
    case = CASES[name]
    model = build(case)
    model.load_state_dict(checkpoint_filter_fn(authors_state_dict(case)))
    for vector in case['inputs']:
        x = torch.randn(vector['input_shape'], generator=torch.Generator().manual_seed(vector['input_seed']))
        with torch.no_grad():
            logits = model(x)
        torch.testing.assert_close(logits, torch.tensor(vector['logits']), rtol=0, atol=1e-4,
                                   msg=lambda m: f"{name} at {vector['input_shape']}: {m}")
