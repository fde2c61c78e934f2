"""Writing a FAT model for deployment, and checking the written file: ONNX (PyTorch's current,
``torch.export``-based exporter, run with ONNX Runtime on CPU to check) or a ``torch.export`` program
(``.pt2``). Both take any batch size and any image size from ``MIN_SIZE`` up (dynamic dimensions).

Depthwise convs are exported as PyTorch's own (``MODEL.DWCONV_IMPL torch``): our kernels are never
exported, and the FASA attention (``scaled_dot_product_attention``) and the refined downsampling need
no custom op. ``onnx``, ``onnxscript`` and ``onnxruntime`` are optional packages, imported only here.
"""
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
from torch.export import Dim

from utils import ExportError, UserInputError, write_atomically

from .dwconv import set_dwconv_impl

FORMATS = ('.onnx', '.pt2')
MIN_SIZE = 64  # two pixels at the last stage's stride of 32: below, the exported graph's guards fail
TOLERANCE = 1e-4  # max |logit difference| the written file may show against PyTorch
ONNX_PACKAGES = 'pip install onnx onnxscript onnxruntime'


def check_destination(path: Path) -> None:
    """``path`` has a known suffix and its folder takes a new file; else one error naming the problem."""
    if path.suffix not in FORMATS:
        raise UserInputError(f'--export {path}: unknown format {path.suffix or "(no suffix)"!r}; '
                             f'use one of {", ".join(FORMATS)}, or a folder name without a suffix (the Hugging Face '
                             'Hub form that timm loads)')
    folder = path.parent
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.export-probe-')
    except OSError as error:
        raise UserInputError(f'--export {path}: cannot write in {folder} ({error.strerror})') from error
    os.close(fd)
    os.remove(probe)
    if path.is_dir():
        raise UserInputError(f'--export {path}: is a folder')


def deployable(model: nn.Module) -> nn.Module:
    """``model`` in eval mode on the CPU with PyTorch's depthwise convs (what is exported)."""
    return set_dwconv_impl(model.eval().cpu(), 'torch')


def _dynamic_shapes() -> Tuple[Dict[int, Dim]]:
    return ({0: Dim('batch', min=1, max=65536), 2: Dim('height', min=MIN_SIZE, max=16384),
             3: Dim('width', min=MIN_SIZE, max=16384)},)


def onnx_program(model: nn.Module, example: torch.Tensor) -> Tuple[Callable[[str], None], Callable[[str], Callable],
                                                                 str]:
    """ONNX export of ``model``: (save it to a path, load a path into a function that runs it with ONNX
    Runtime on CPU, a description naming the opset)."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter's translator; imported here to name it when missing)
    except ImportError as error:
        raise UserInputError(f'--export .onnx needs the optional packages onnx, onnxscript and onnxruntime '
                             f'({error.name} is missing): {ONNX_PACKAGES}') from error
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_dynamic_shapes(),
                                input_names=['images'], output_names=['logits'], verbose=False)

    def load(path: str) -> Callable:
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        return lambda images: torch.from_numpy(session.run(None, {'images': images.numpy()})[0])
    opset = program.model.opset_imports.get('', '?')
    return program.save, load, f'ONNX opset {opset}, checked with ONNX Runtime {onnxruntime.__version__} (CPU)'


def export_program(model: nn.Module, example: torch.Tensor) -> Tuple[Callable[[str], None], Callable[[str], Callable],
                                                                   str]:
    """``torch.export`` of ``model``: (save it to a path, load a path back, a description)."""
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes())
    return (lambda path: torch.export.save(program, path), lambda path: torch.export.load(path).module(),
            f'torch.export program (torch {torch.__version__}), checked by loading it back')


def export(model: nn.Module, path: Path, size: int, logger) -> List[Tuple[Tuple[int, ...], float]]:
    """Write ``model`` to ``path`` (.onnx or .pt2) from an example of ``size`` x ``size``: the new file
    is run on new random images, at that size and at a non-square one with another batch size,
    against the PyTorch model, and replaces ``path`` only when it reproduces it (a previous file
    stays otherwise; the new one gets the umask's permissions). Returns (input shape, max |logit
    difference|) per check; an ``ExportError`` names the first above ``TOLERANCE``."""
    model = deployable(model)
    if size < MIN_SIZE:
        raise UserInputError(f'--export needs DATA.IMG_SIZE >= {MIN_SIZE} (the last stage has stride 32), got {size}')
    example = torch.randn(2, 3, size, size)
    checks: List[Tuple[Tuple[int, ...], float]] = []

    def check(written: str) -> None:  # the new file, before it replaces anything at ``path``
        run = load(written)
        for shape in ((2, 3, size, size), (1, 3, size, size + 32)):
            images = torch.randn(shape)
            difference = (run(images) - model(images)).abs().max().item()
            checks.append((shape, difference))
            logger.info(f'{path}: input {shape}, max |logit difference| against PyTorch {difference:.2e}')
            if not difference <= TOLERANCE:  # NaN too
                raise ExportError(f'{path} was not written: the exported model does not reproduce the PyTorch logits '
                                  f'(max |difference| {difference:.3g} at input {shape}, tolerance {TOLERANCE:g})')

    with torch.no_grad():
        save, load, what = (onnx_program if path.suffix == '.onnx' else export_program)(model, example)
        write_atomically(str(path), lambda f: save(f.name), check)
    logger.info(f'wrote {path}: {what}; dynamic batch, height and width (>= {MIN_SIZE})')
    return checks
