"""The FAT model family. Importing this package registers fat_b0..fat_b3 with timm."""
from .backbone import FATBackbone
from .build import (arch_overrides, build_backbone, build_model, check_architecture, choose_run_kernels,
                    kernel_decisions)
from .dwconv import DepthwiseConv2d, choose_kernels, create_dwconv, set_dwconv_impl
from .fat import FAT, MODEL_ARGS, checkpoint_filter_fn
from .flops import count_macs

__all__ = ['FAT', 'FATBackbone', 'MODEL_ARGS', 'arch_overrides', 'build_backbone', 'build_model', 'check_architecture',
           'checkpoint_filter_fn', 'choose_kernels', 'choose_run_kernels', 'count_macs', 'create_dwconv',
           'DepthwiseConv2d', 'kernel_decisions', 'set_dwconv_impl']
