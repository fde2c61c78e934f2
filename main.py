"""Train, evaluate, benchmark or export FAT on ImageNet-style data.

    torchrun --nproc_per_node 8 main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet
    python main.py --cfg configs/fat_b0_224.yaml --data-path /data/imagenet --eval --resume ckpt.pth
    python main.py --cfg configs/fat_b0_224.yaml --throughput
    python main.py --cfg configs/fat_b0_224.yaml --resume ckpt.pth --export fat_b0_in1k   # a timm/Hub folder

Image classification is a task of the one run engine (``engine/``): ``classification/`` says how
to build its data, model, loss and metric and holds its tools (throughput, export); the engine
trains, evaluates, checkpoints and resumes. This file is the entry point.
"""
from __future__ import annotations

import engine
from classification import Classification, classification_defaults, export, throughput
from classification.config import CLASSIFICATION_CHOICES, check_config
from config import parse_command_line
from utils import run_entry_point


def main(config) -> None:
    """The story of a run: join the processes and open the run folder, then measure throughput, or
    export the model, or evaluate a checkpoint, or train (resuming where the folder left off)."""
    session = engine.start(config)
    if config.THROUGHPUT_MODE:
        throughput(session)
        return
    if config.EXPORT:
        export(session)
        return
    engine.train_or_evaluate(Classification(session))


if __name__ == '__main__':
    run_entry_point(lambda: main(parse_command_line('FAT training and evaluation', classification_defaults(),
                                                    CLASSIFICATION_CHOICES, check_config)))
