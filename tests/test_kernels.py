"""kernels/dwconv: it compiles here, it falls back safely, and (on a GPU) it matches F.conv2d."""
import logging
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

import kernels.dwconv as dwconv

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(scope='session')
def extension(tmp_path_factory):
    """A real build with this machine's nvcc into a fresh folder: once per test run."""
    if shutil.which('nvcc') is None and not torch.utils.cpp_extension.CUDA_HOME:
        pytest.skip('nvcc not found: the CUDA extension cannot be compiled here')
    patch = pytest.MonkeyPatch()
    patch.setenv('FAT_KERNELS_BUILD_DIR', str(tmp_path_factory.mktemp('fat_kernels_build')))
    dwconv._extension.clear()
    try:
        module = dwconv.load_extension()
    finally:
        patch.undo()
    assert module is not None, 'the extension failed to compile (see the warning above)'
    return module


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(dwconv, '_extension', {})
    monkeypatch.setattr(dwconv, '_usable', {})


def test_extension_compiles_with_this_machines_nvcc(extension):
    for name in ('forward', 'input_grad', 'weight_grad'):
        assert callable(getattr(extension, name))


def test_never_usable_on_cpu():
    assert not dwconv.is_usable(torch.device('cpu'))


def test_build_failure_warns_once_and_falls_back(fresh_state, monkeypatch, caplog):
    def broken_build(verbose):
        raise RuntimeError('Error building extension fat_dwconv_cuda: nvcc exited with 1')

    monkeypatch.setattr(dwconv, '_build', broken_build)
    monkeypatch.setitem(__import__('sys').modules, 'fat_dwconv_cuda', None)  # no installed build either
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert dwconv.load_extension() is None
        assert dwconv.load_extension() is None
        assert not dwconv.is_usable(torch.device('cuda', 0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum('could not be built' in w and 'nvcc exited with 1' in w for w in warnings) == 1
    assert sum('not used on cuda:0' in w for w in warnings) == 1


def reference_op(x, w, b, stride):
    return F.conv2d(x, w, b, stride, w.shape[-1] // 2, 1, x.shape[1])


def test_self_check_accepts_a_correct_op_and_names_a_wrong_one():
    cpu = torch.device('cpu')
    assert dwconv.self_check(cpu, reference_op) is None
    assert 'output differs' in dwconv.self_check(cpu, lambda x, w, b, s: reference_op(x, w, b, s) * 1.01)
    assert 'stride 2' in dwconv.self_check(cpu, lambda x, w, b, s: reference_op(x, w, b, 1)[..., ::s, ::s] + (s == 2))


def test_failed_self_check_makes_the_extension_unusable_with_one_warning(fresh_state, monkeypatch, caplog):
    monkeypatch.setattr(dwconv, 'load_extension', lambda verbose=False: types.SimpleNamespace())
    monkeypatch.setattr(dwconv, 'self_check', lambda device: 'weight grad differs from F.conv2d for kernel 7 stride 2')
    device = torch.device('cuda', 0)
    with caplog.at_level(logging.WARNING, logger='kernels.dwconv'):
        assert not dwconv.is_usable(device)
        assert not dwconv.is_usable(device)
    assert len([r for r in caplog.records if 'weight grad differs' in r.getMessage()]) == 1


def test_auto_keeps_cudnn_until_measured_and_supported_shapes():
    assert not any(dwconv.preferred(k, s, d) for k in (3, 5, 7, 9) for s in (1, 2)
                   for d in (torch.float16, torch.bfloat16, torch.float32))
    assert dwconv.supports(3, 1) and dwconv.supports(31, 2)
    assert not dwconv.supports(4, 1) and not dwconv.supports(33, 1) and not dwconv.supports(5, 3)


# --- on a GPU ------------------------------------------------------------------------------------

@needs_gpu
def test_gpu_self_check_passes(extension):
    assert dwconv.is_usable(torch.device('cuda'))


@needs_gpu
@pytest.mark.parametrize('stride', [1, 2])
def test_gradcheck_float64(extension, stride):
    x = torch.randn(2, 3, 9, 11, device='cuda', dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, device='cuda', dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device='cuda', dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: dwconv.depthwise_conv2d(x, w, b, stride), (x, w, b))


@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('kernel_size', [3, 5, 7, 9, 11, 31])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape', [(1, 16, 13, 17), (3, 8, 56, 56)])
def test_matches_cudnn_forward_and_backward(extension, dtype, kernel_size, stride, channels_last, shape):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device='cuda', dtype=dtype).to(memory_format=fmt).requires_grad_()
    w = torch.randn(shape[1], 1, kernel_size, kernel_size, device='cuda', dtype=dtype, requires_grad=True)
    b = torch.randn(shape[1], device='cuda', dtype=dtype, requires_grad=True)
    out = dwconv.depthwise_conv2d(x, w, b, stride)
    assert out.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (x, w, b), grad))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference_op(x64, w64, b64, stride)
    want = (ref, *torch.autograd.grad(ref, (x64, w64, b64), grad.double()))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * r.abs().max().item())


@needs_gpu
def test_model_runs_on_our_kernel_under_autocast(extension):
    import models
    model = models.FAT(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3),
                       num_classes=10, dwconv_impl='cuda').cuda()
    reference = models.FAT(embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3),
                           num_classes=10, dwconv_impl='torch').cuda()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out, ref = model(x), reference(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@needs_gpu
def test_more_planes_than_a_grid_dimension_holds(extension):
    x = torch.randn(128, 520, 8, 8, device='cuda', dtype=torch.float16)  # N * C = 66,560 > 65,535
    w = torch.randn(520, 1, 5, 5, device='cuda', dtype=torch.float16)
    torch.testing.assert_close(dwconv.depthwise_conv2d(x, w, None, 2).float(),
                               reference_op(x.float(), w.float(), None, 2), rtol=1e-2, atol=5e-2)
