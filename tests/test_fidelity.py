"""Fidelity in every clone: FAT-B0..B3 (at 224) and a small odd configuration (at odd sizes) reproduce
the logits of the authors' code (qhfan/FAT), from compact vectors that ship with the tests.

``data/fat_seeded_vectors.json`` holds, per case, the authors' constructor arguments and state-dict key
layout, a seed and a rule that rebuild the weights (stated in the file), input seeds and shapes, and
the authors' logits. The variants are built from our registry (``timm.create_model``), so the variant
table is what is checked, and the weights go through ``checkpoint_filter_fn`` as an authors' checkpoint
does.
"""
import json
import math
from pathlib import Path

import pytest
import timm
import torch

import models
from models.fat import FAT, checkpoint_filter_fn

VECTORS = json.loads((Path(__file__).parent / 'data' / 'fat_seeded_vectors.json').read_text())
CASES = {case['name']: case for case in VECTORS['cases']}


def authors_state_dict(case: dict) -> dict:
    """The weights the file's rule makes: one generator, the keys in the authors' order."""
    g = torch.Generator().manual_seed(case['weight_seed'])
    state = {}
    for key, shape in case['keys']:
        if key.endswith('num_batches_tracked'):
            state[key] = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith('running_var'):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith('running_mean'):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1 and key.endswith('weight'):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith('bias'):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return state


def build(case: dict) -> FAT:
    if case['name'] in models.MODEL_ARGS:
        model = timm.create_model(case['name'], num_classes=case['authors_args']['num_classes'])
    else:
        model = FAT(**case['authors_args'])
    return model.eval()


def test_the_rule_is_the_files():
    """The weight rule above is the one the file states (a changed file must change this test)."""
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
