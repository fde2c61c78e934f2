"""One training epoch of main.py's data under torchrun, identified by content: every process reads its
share through ``classification.data.build_loader`` and prints the sorted sample fingerprints (a hash
of the decoded pixels) with their labels, gathered on rank 0, as one JSON line. Used by test_shards.py:

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/loader_driver.py DATA_PATH BATCH_SIZE [KEY VALUE ...]
"""
import hashlib
import json
import sys
from argparse import Namespace

import numpy as np
import torch

from classification import get_config
from classification.data import build_loader
from utils import gather_objects, init_distributed


def fingerprint(image) -> int:
    return int.from_bytes(hashlib.sha256(np.asarray(image).tobytes()).digest()[:7], 'little')


def main() -> None:
    data_path, batch_size, *opts = sys.argv[1:]
    config = get_config(Namespace(cfg=None, opts=['DATA.DATA_PATH', data_path, 'DATA.BATCH_SIZE', batch_size,
                                                  'DATA.NUM_WORKERS', '0', 'DEVICE', 'cpu', *opts]))
    rank, _, _ = init_distributed('cpu')
    data = build_loader(config)
    data.train.loader.dataset.dataset.transform = fingerprint  # SeededSamples over the split's data set
    data.train.set_epoch(1)
    seen = [(int(f), int(t)) for prints, targets in data.train for f, t in zip(prints, targets)]
    everything = gather_objects(seen)
    if rank == 0:
        print(json.dumps({'batches': len(data.train), 'per_rank': [len(s) for s in everything],
                          'samples': sorted(s for part in everything for s in part)}))
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
