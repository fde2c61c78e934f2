"""create_logger: coloured console lines from rank 0, and the full log in OUTPUT/.../log.txt."""
from __future__ import annotations

import logging
import os
import sys

from termcolor import colored


def create_logger(output_dir: str, dist_rank: int = 0, name: str = 'fat') -> logging.Logger:
    """A logger that prints on rank 0 and writes ``log.txt`` (rank 0) in ``output_dir``."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
    color_fmt = colored('[%(asctime)s %(name)s]', 'green') + colored('(%(filename)s %(lineno)d)', 'yellow') + \
        ': %(levelname)s %(message)s'
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(color_fmt, datefmt='%Y-%m-%d %H:%M:%S'))
        logger.addHandler(console)
        file_handler = logging.FileHandler(os.path.join(output_dir, 'log.txt'), mode='a')
        file_handler.setFormatter(logging.Formatter(fmt, datefmt='%Y-%m-%d %H:%M:%S'))
        logger.addHandler(file_handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger
