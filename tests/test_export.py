"""main.py --export: ONNX (checked with ONNX Runtime) and torch.export (.pt2) files that reproduce the
PyTorch logits of the checkpoint they were given, at the config's size and a non-square one, and one
`error:` line for each kind of bad input."""
import os
from pathlib import Path

import pytest
import torch

from helpers import run_main
from models.fat import FAT

ARCH = dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=7)
OPTS = ['MODEL.FAT.EMBED_DIMS', '[8, 16, 16, 16]', 'MODEL.FAT.DEPTHS', '[1, 1, 1, 1]',
        'MODEL.FAT.NUM_HEADS', '[1, 1, 1, 1]', 'MODEL.NUM_CLASSES', '7', 'DATA.IMG_SIZE', '64']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A bare state dict of the tiny model with trained-looking (not freshly initialised) weights and
    BatchNorm statistics, and that model."""
    torch.manual_seed(0)
    model = FAT(**ARCH).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor)).abs_() if 'running_var' in name else \
                    tensor.add_(0.05 * torch.randn_like(tensor))
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    torch.save(model.state_dict(), path)
    return path, model


def logits_of(path: Path, images: torch.Tensor) -> torch.Tensor:
    """Run a written file as a deployment would: ONNX Runtime, or the loaded torch.export program."""
    if path.suffix == '.onnx':
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    return torch.export.load(str(path)).module()(images)


@pytest.mark.parametrize('suffix,reparam,impl', [('.onnx', True, 'auto'), ('.pt2', False, 'cuda')])
def test_export_reproduces_the_checkpoints_logits_at_any_size(tmp_path, checkpoint, suffix, reparam, impl):
    """Also: MODEL.DWCONV_IMPL cuda exports PyTorch's depthwise convs, and says so."""
    ckpt, model = checkpoint
    out = tmp_path / f'fat{suffix}'
    proc = run_main('--cfg', 'configs/fat_b0_224.yaml', '--export', out, '--resume', ckpt, '--output', tmp_path,
                    *(['--reparam'] if reparam else []), '--opts', *OPTS, 'MODEL.DWCONV_IMPL', impl)
    checked = [line for line in proc.stdout.splitlines() if 'max |logit difference| against PyTorch' in line]
    assert len(checked) == 2 and '(1, 3, 64, 96)' in checked[1], proc.stdout  # the config's size, then non-square
    assert ('opset' in proc.stdout) == (suffix == '.onnx') and ('deploy form' in proc.stdout) == reparam
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temporary file left
    assert ('our kernels (MODEL.DWCONV_IMPL cuda) are never exported' in proc.stdout) == (impl == 'cuda')
    if suffix == '.pt2':
        targets = {str(node.target) for node in torch.export.load(str(out)).graph.nodes}
        assert not any(t.startswith('fat.') for t in targets) and any('conv' in t for t in targets)
    for shape in ((1, 3, 64, 64), (3, 3, 96, 80)):  # another batch and a non-square size than the command checked
        images = torch.randn(shape)
        with torch.no_grad():
            want = model(images)
        torch.testing.assert_close(logits_of(out, images), want, rtol=0, atol=1e-4)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith('error:')]


@pytest.mark.parametrize('target,message', [
    ('model.tflite', "unknown format '.tflite'"),
    ('missing-folder/model.onnx', 'cannot write in'),
])
def test_bad_destination_is_one_error_line(tmp_path, target, message):
    proc = run_main('--cfg', 'configs/fat_b0_224.yaml', '--export', tmp_path / target, '--output', tmp_path,
                    '--opts', *OPTS, check=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and message in error_lines(proc)[0], proc.stderr


def test_checkpoint_of_another_architecture_is_one_error_line(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    proc = run_main('--cfg', 'configs/fat_b0_224.yaml', '--export', tmp_path / 'b0.pt2', '--resume', ckpt,
                    '--output', tmp_path, '--opts', 'DATA.IMG_SIZE', '64', check=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert 'does not fit this model' in error_lines(proc)[0] and not (tmp_path / 'b0.pt2').exists()


def test_missing_onnx_packages_are_named(tmp_path, monkeypatch):
    hide = tmp_path / 'hide'
    hide.mkdir()
    (hide / 'sitecustomize.py').write_text("import sys\nsys.modules['onnxruntime'] = None\n")
    monkeypatch.setenv('PYTHONPATH', str(hide))
    proc = run_main('--cfg', 'configs/fat_b0_224.yaml', '--export', tmp_path / 'fat.onnx', '--output', tmp_path,
                    '--opts', *OPTS, check=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert 'pip install onnx onnxscript onnxruntime' in error_lines(proc)[0]


class NoisyHead(torch.nn.Module):
    """A model whose output changes on every call: no exported file can reproduce it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3)) + torch.rand(images.shape[0], 3)


def test_a_failed_export_leaves_the_previous_file_and_a_new_one_follows_the_umask(tmp_path):
    # Mutations caught: the file replaced before its check (the previous export was lost); the new
    # file made with mkstemp's private 0600 (the umask's 0640 asked for).
    import logging
    from models.export import export
    from utils import ExportError
    path = tmp_path / 'model.pt2'
    path.write_bytes(b'the previous export')
    with pytest.raises(ExportError, match='model.pt2 was not written: the exported model does not reproduce'):
        export(NoisyHead(), path, 64, logging.getLogger('test'))
    assert path.read_bytes() == b'the previous export' and [p.name for p in tmp_path.iterdir()] == ['model.pt2']

    previous = os.umask(0o027)
    try:
        export(FAT(**ARCH), path, 64, logging.getLogger('test'))
    finally:
        os.umask(previous)
    assert path.read_bytes() != b'the previous export' and path.stat().st_mode & 0o777 == 0o640
