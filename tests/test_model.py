"""The FAT model: faithfulness to the reference, the timm interface, any input size, deploy form."""
import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.fat import FASA, FAT, checkpoint_filter_fn

TESTDATA = Path(__file__).resolve().parents[2] / 'shared' / 'testdata' / 'official-fat'
VARIANTS = ['fat_b0', 'fat_b1', 'fat_b2', 'fat_b3']
PARAMS = {'fat_b0': 4_494_488, 'fat_b1': 7_819_720, 'fat_b2': 13_466_728, 'fat_b3': 29_196_264}
GMACS = {'fat_b0': 0.754, 'fat_b1': 1.243, 'fat_b2': 2.131, 'fat_b3': 4.632}
TINY = dict(embed_dims=(16, 24, 32, 48), depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 3), num_classes=10)


def load_vector(name):
    path = TESTDATA / f'{name}_vector.pth'
    if not path.exists():
        pytest.skip(f'test vectors not found at {path}')
    return torch.load(path, weights_only=True)


def tiny_model(**kwargs) -> FAT:
    return FAT(**dict(TINY, **kwargs))


@pytest.fixture(scope='module')
def fat_b0() -> FAT:
    torch.manual_seed(0)
    return timm.create_model('fat_b0').eval()


# --- faithful -----------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', VARIANTS)
def test_trainable_parameter_count_matches_reference(variant):
    model = timm.create_model(variant)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMS[variant]


@pytest.mark.parametrize('variant', VARIANTS)
def test_flops_match_reference_within_3_percent(variant):
    gmacs = models.count_macs(timm.create_model(variant), (3, 224, 224)) / 1e9
    assert gmacs == pytest.approx(GMACS[variant], rel=0.03)


@pytest.mark.parametrize('name', ['tiny', 'fat_b0'])
def test_reference_state_dict_reproduces_reference_logits(name):
    vector = load_vector(name)
    model = FAT(**vector['config']).eval()
    model.load_state_dict(checkpoint_filter_fn(vector['state_dict']))
    with torch.no_grad():
        logits = model(vector['input'])
    torch.testing.assert_close(logits, vector['logits'], rtol=0, atol=1e-4)


def test_wrapped_and_ddp_prefixed_official_checkpoint_loads_through_timm(tmp_path):
    vector = load_vector('tiny')
    wrapped = {'model': {'module.' + k: v for k, v in vector['state_dict'].items()}, 'epoch': 3}
    torch.save(wrapped, tmp_path / 'official.pth')
    model = timm.create_model('fat_b0', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'official.pth'), num_classes=10),
                              **{k: v for k, v in TINY.items()}).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(vector['input']), vector['logits'], rtol=0, atol=1e-4)


def test_own_state_dict_passes_filter_unchanged():
    model = tiny_model()
    state = model.state_dict()
    filtered = checkpoint_filter_fn({'state_dict': state})
    assert list(filtered) == list(state)


def test_fasa_equals_literal_reference_formula():
    torch.manual_seed(0)
    fasa = FASA(dim=32, num_heads=4, kernel_size=5, window_size=4).eval()
    x = torch.randn(2, 32, 13, 19)
    with torch.no_grad():
        b, c, h, w = x.shape
        q = fasa.q(x)
        kv = fasa.kv(fasa.kv_pool(x))
        n = kv.shape[-2] * kv.shape[-1]
        k, v = kv.reshape(b, 2, 4, 8, n).permute(1, 0, 2, 4, 3)
        qh = q.reshape(b, 4, 8, h * w).transpose(-1, -2)
        attn = (qh @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)
        g = (attn @ v).transpose(-1, -2).reshape(b, c, h, w)
        l = fasa.local(q)
        l = l * torch.sigmoid(l)
        expected = fasa.proj(l * torch.sigmoid(g) * g)
        torch.testing.assert_close(fasa(x), expected, rtol=1e-5, atol=1e-5)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    model = timm.create_model('fat_b0', drop_path_rate=0.1)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12))


# --- timm-native ----------------------------------------------------------------------------------

def test_timm_registry_and_pretrained_config():
    assert set(VARIANTS) <= set(timm.list_models('fat_*'))
    cfg = timm.create_model('fat_b1').pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['interpolation'] == 'bicubic'
    assert cfg['crop_pct'] == 0.875
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    model = timm.create_model('fat_b1')
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()


def test_create_model_arguments():
    model = timm.create_model('fat_b0', num_classes=7, drop_path_rate=0.2, in_chans=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    assert model.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_classifier_interface(fat_b0):
    model = timm.create_model('fat_b0', num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 256, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 256, 2, 2)
    assert model.no_weight_decay() == set()


def test_group_matcher_covers_every_parameter():
    from timm.models import group_parameters
    model = tiny_model()
    groups = group_parameters(model, model.group_matcher())
    names = {name for group in groups.values() for name in group}
    assert names == {name for name, _ in model.named_parameters()}
    assert len(groups) == 1 + 8 + 1  # stem, each block (the final norm joins the last), head


def test_grad_checkpointing_gives_same_output_and_gradients():
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_features_only_returns_the_four_pyramid_maps():
    model = timm.create_model('fat_b0', features_only=True).eval()
    assert model.feature_info.channels() == [32, 80, 160, 256]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 56, 56), (1, 80, 28, 28), (1, 160, 14, 14), (1, 256, 7, 7)]


def test_pyramid_maps_are_taken_before_the_strided_ffn(fat_b0):
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, maps = fat_b0.forward_intermediates(x)
        stage0 = fat_b0.stages[0]
        h = stage0.blocks[0](fat_b0.stem(x))
        torch.testing.assert_close(maps[0], stage0.blocks[1].forward_mixer(h))
        torch.testing.assert_close(final, fat_b0.forward_features(x))
        assert fat_b0.forward_intermediates(x, indices=[1], intermediates_only=True)[0].shape == maps[1].shape


def test_features_only_with_fewer_stages_drops_unused_layers():
    model = timm.create_model('fat_b0', features_only=True, out_indices=(0, 1))
    maps = model(torch.randn(2, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [32, 80]
    sum(m.sum() for m in maps).backward()
    assert all(p.grad is not None for p in model.parameters()), 'every kept parameter must be used'


# --- any input size, plain BatchNorm ------------------------------------------------------------

@pytest.mark.parametrize('size', [(64, 64), (224, 224), (256, 256), (320, 320), (200, 300), (97, 45)])
@pytest.mark.parametrize('training', [True, False])
def test_any_input_size(size, training):
    model = tiny_model().train(training)
    batch = 2 if training else 1
    out = model(torch.randn(batch, 3, *size))
    assert out.shape == (batch, 10) and torch.isfinite(out).all()


def test_batch_one_trains():
    model = tiny_model().train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_uses_plain_batchnorm():
    model = timm.create_model('fat_b0')
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)


def test_build_model_from_config():
    from argparse import Namespace

    from classification import get_config
    config = get_config(Namespace(cfg=None, opts=['MODEL.VARIANT', 'fat_b0', 'MODEL.NUM_CLASSES', '10',
                                                  'MODEL.DWCONV_IMPL', 'torch']))
    model = models.build_model(config)
    assert sum(p.numel() for p in model.parameters()) == PARAMS['fat_b0'] - 1000 * 257 + 10 * 257
    assert all(m.impl == 'torch' for m in model.modules() if isinstance(m, models.DepthwiseConv2d))
    config = get_config(Namespace(cfg=None, opts=['MODEL.VARIANT', 'fat_b1', 'MODEL.FAT.DEPTHS', '[1, 1, 2, 1]']))
    model = models.build_model(config)
    assert [len(stage.blocks) for stage in model.stages] == [1, 1, 2, 1], 'MODEL.FAT overrides one entry'
    assert model.stages[0].blocks[0].attn.num_heads == 3, 'the rest is the variant\'s'
    config = get_config(Namespace(cfg=None, opts=['MODEL.VARIANT', 'fat_b9']))
    with pytest.raises(ValueError, match="MODEL.VARIANT is 'fat_b9'"):
        models.build_model(config)


def test_attention_runs_on_sdpa_with_unit_stride_heads(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    model = tiny_model().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        model.to(memory_format=torch.channels_last)(torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last))
    assert len(calls) == 2 * sum(TINY['depths'])
    assert all(strides == (1, 1, 1) for strides in calls)


def test_channels_last_matches_nchw(fat_b0):
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = fat_b0(x)
        model = timm.create_model('fat_b0').eval()
        model.load_state_dict(fat_b0.state_dict())
        model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast('cpu', dtype=dtype):
            out = model(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)


def test_reparameterize_folds_every_batchnorm_and_keeps_logits():
    torch.manual_seed(0)
    model = timm.create_model('fat_b0').eval()
    for m in model.modules():  # non-trivial statistics, so folding is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(2, 3, 112, 144)
    with torch.no_grad():
        expected = model(x)
        modules_before = sum(1 for m in model.modules() if not isinstance(m, nn.Identity))
        model.reparameterize()
        out = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(1 for m in model.modules() if not isinstance(m, nn.Identity)) < modules_before
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_timm_reparameterize_model_gives_same_logits():
    from timm.utils.model import reparameterize_model
    model = tiny_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reparameterize_model(model)(x), model(x), rtol=0, atol=1e-4)


def test_reparameterize_refuses_training_mode():
    with pytest.raises(RuntimeError, match='eval'):
        tiny_model().train().reparameterize()


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = FAT(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


# --- one place for depthwise convs ---------------------------------------------------------------

def test_every_depthwise_conv_comes_from_the_factory():
    model = timm.create_model('fat_b0')
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(isinstance(m, models.DepthwiseConv2d) for m in depthwise)
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_dwconv_impl_keeps_parameters_and_keys():
    torch.manual_seed(0)
    auto = tiny_model(dwconv_impl='auto')
    torch.manual_seed(0)
    torch_impl = tiny_model(dwconv_impl='torch')
    assert list(auto.state_dict()) == list(torch_impl.state_dict())
    for a, b in zip(auto.state_dict().values(), torch_impl.state_dict().values()):
        assert torch.equal(a, b)
    models.set_dwconv_impl(torch_impl, 'cuda')
    assert {m.impl for m in torch_impl.modules() if isinstance(m, models.DepthwiseConv2d)} == {'cuda'}
    with pytest.raises(ValueError, match='unknown depthwise-conv implementation'):
        tiny_model(dwconv_impl='triton')


def test_dwconv_dispatches_cuda_tensors_to_the_extension(monkeypatch):
    import types
    from kernels.dwconv import Case
    from models import dwconv

    calls, asked = [], []
    fake = types.SimpleNamespace(
        Case=Case, is_usable=lambda device, k, s, dtype: True, supports=lambda k, s: True,
        choose=lambda device, case, measure=True: asked.append((case, measure)) or case.kernel_size >= 7,
        depthwise_conv2d=lambda x, w, b, s: calls.append((w.shape, s)) or F.conv2d(x, w, b, s, w.shape[-1] // 2, 1, w.shape[0]),
    )
    monkeypatch.setattr(dwconv, '_kernels', lambda: fake)
    cuda_input = types.SimpleNamespace(is_cuda=True, device=torch.device('cuda', 0), dtype=torch.float16,
                                       requires_grad=True, shape=(4, 8, 9, 11),
                                       is_contiguous=lambda memory_format=None: True)
    assert dwconv.create_dwconv(8, 7)._use_extension(cuda_input)
    assert asked == [(Case(7, 1, torch.float16, False, (4, 8, 9, 11), True), True)], 'the case as run, timed'
    assert not dwconv.create_dwconv(8, 3)._use_extension(cuda_input), 'auto keeps cuDNN where ours is not chosen'
    assert dwconv.create_dwconv(8, 3, impl='cuda')._use_extension(cuda_input)
    assert not dwconv.create_dwconv(8, 7, impl='torch')._use_extension(cuda_input)
    installed = dwconv.create_dwconv(8, 3)
    installed.chosen = {'train': True, 'infer': False}  # choose_kernels' decision wins over the case's
    asked.clear()
    assert installed._use_extension(cuda_input) and not asked
    with torch.no_grad():
        assert not installed._use_extension(cuda_input)
    conv = dwconv.create_dwconv(8, 7, impl='cuda')
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 3, 1, 8))
    assert not calls, "impl 'cuda' leaves CPU tensors on PyTorch"
    monkeypatch.setattr(dwconv.DepthwiseConv2d, '_use_extension', lambda self, x: True)
    conv(x)
    assert calls == [(torch.Size([8, 1, 7, 7]), 1)]


def test_dwconv_asks_for_the_tables_when_several_processes_run(monkeypatch):
    """A conv no converter decided is not timed per process under torch.distributed: each could time
    it differently; the measured tables say the same on every one."""
    import types
    from kernels.dwconv import Case
    from models import dwconv

    asked = []
    monkeypatch.setattr(dwconv, '_kernels', lambda: types.SimpleNamespace(
        Case=Case, choose=lambda device, case, measure=True: asked.append(measure) or False))
    monkeypatch.setattr(dwconv, 'rank_world', lambda: (0, 2))
    dwconv._extension_chosen(torch.device('cpu'), 5, 1, torch.float32, False, (2, 8, 9, 9), True)
    assert asked == [False]


def run_ours(model: nn.Module) -> nn.Module:
    """``model`` with our kernel chosen for every depthwise conv, as choose_kernels installs a choice
    (on CPU only training can run it)."""
    for module in model.modules():
        if isinstance(module, models.DepthwiseConv2d):
            module.install({'train': True, 'infer': True})
    return model


def grad_fn_names(output):
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def test_cpu_training_uses_our_depthwise_gradients_and_matches_pytorch():
    import kernels.dwconv
    if not kernels.dwconv.is_usable('cpu'):
        pytest.fail('the CPU depthwise kernel did not build here (see the warning above)')
    torch.manual_seed(0)
    ours = run_ours(tiny_model().train().to(memory_format=torch.channels_last))
    plain = models.set_dwconv_impl(tiny_model().train(), 'torch').to(memory_format=torch.channels_last)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 72, 56).to(memory_format=torch.channels_last)
    out_ours, out_plain = ours(x), plain(x)
    torch.testing.assert_close(out_ours, out_plain, rtol=1e-5, atol=1e-5)
    ours_fns, plain_fns = grad_fn_names(out_ours), grad_fn_names(out_plain)
    assert 'DepthwiseConv2dCPUFunctionBackward' in ours_fns  # the FFN's fused GELU + conv
    assert any('fat_depthwise_conv2d' in name for name in ours_fns)  # the other convs: our operator
    assert not any('DepthwiseConv2dCPU' in name or 'fat_depthwise' in name for name in plain_fns)
    out_ours.square().sum().backward()
    out_plain.square().sum().backward()
    scale = max(p.grad.abs().max() for p in plain.parameters())
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    with torch.no_grad():  # inference never takes the autograd path
        conv = ours.stages[1].blocks[0].cpe
        assert not conv._use_extension(torch.randn(1, conv.in_channels, 8, 8, requires_grad=True))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not conv._use_extension(torch.randn(1, conv.in_channels, 8, 8, requires_grad=True))


def test_cpu_training_ffn_keeps_one_activation_fewer_for_backward(saved_bytes):
    import kernels.dwconv
    # also runs the kernel's first-use self-check now, not inside the measurement below
    if not kernels.dwconv.is_usable('cpu'):
        pytest.fail('the CPU depthwise kernel did not build here (see the warning above)')
    from models.fat import ConvFFN
    torch.manual_seed(0)
    ffn = run_ours(ConvFFN(16, 64, 16, 5, 1).train())
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    fused = saved_bytes(ffn, x)
    unfused = saved_bytes(models.set_dwconv_impl(ffn, 'torch'), x)
    hidden_map = 2 * 64 * 20 * 20 * 4
    assert unfused - fused == hidden_map


def test_dwconv_cuda_impl_fails_loudly_when_extension_unusable(monkeypatch):
    import types
    from models import dwconv

    unusable = types.SimpleNamespace(is_usable=lambda device, k, s, dtype: False, supports=lambda k, s: True)
    monkeypatch.setattr(dwconv, '_kernels', lambda: unusable)
    cuda_input = types.SimpleNamespace(is_cuda=True, device=torch.device('cuda', 0), dtype=torch.float32,
                                       requires_grad=False, shape=(1, 8, 9, 9),
                                       is_contiguous=lambda memory_format=None: True)
    with pytest.raises(RuntimeError, match='DWCONV_IMPL'):
        dwconv.create_dwconv(8, 7, impl='cuda')._use_extension(cuda_input)
    monkeypatch.setattr(dwconv, '_kernels', lambda: None)
    assert not dwconv.create_dwconv(8, 7, impl='auto')._use_extension(cuda_input), 'auto falls back silently'


# --- traced, scripted: what timm's tests/test_models.py checks ------------------------------------

def test_fx_feature_extraction_by_node_name(fat_b0):
    """timm's FX feature extraction (the depthwise convs are leaves of its tracer) at a non-square size."""
    from timm.models import create_feature_extractor, get_graph_node_names
    nodes = get_graph_node_names(fat_b0)[1]
    stage_ends = {f'stage{i}': [n for n in nodes if n.startswith(f'stages.{i}.')][-1] for i in (0, 2)}
    extractor = create_feature_extractor(fat_b0, return_nodes={**{v: k for k, v in stage_ends.items()}, 'head': 'logits'})
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out, logits = extractor(x), fat_b0(x)
    assert out['stage0'].shape == (1, 80, 8, 12) and out['stage2'].shape == (1, 256, 2, 3)
    torch.testing.assert_close(out['logits'], logits)


def test_fx_symbolic_trace_trains_like_the_model():
    """Plain torch.fx.symbolic_trace (a tracer that knows nothing of timm's leaves), forward and backward."""
    torch.manual_seed(0)
    model = tiny_model().train()
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))  # a graph module shares its root's parameters
    x = torch.randn(2, 3, 64, 48)
    torch.manual_seed(1)
    model(x).square().sum().backward()
    torch.manual_seed(1)
    traced(x).square().sum().backward()
    scale = max(p.grad.abs().max() for p in model.parameters())
    traced_params = dict(traced.named_parameters())
    assert traced_params.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        # the model's CPU depthwise weight gradients are ours, the graph's PyTorch's: sums in another order
        torch.testing.assert_close(traced_params[name].grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_torchscript_matches_eager(fat_b0):
    scripted = torch.jit.script(fat_b0)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), fat_b0(x))


def test_literal_benchmark_baseline_computes_the_same_model():
    from benchmarks.literal_fat import make_literal
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(make_literal(model)(x), expected, rtol=1e-5, atol=1e-5)
