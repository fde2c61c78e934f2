"""create_logger: coloured console lines from rank 0, and the full log in OUTPUT/.../log.txt."""
from __future__ import annotations

import logging
import os
import sys

from termcolor import colored


# Library loggers whose lines (data fetching progress, skipped images) belong in the run's log too.
LIBRARY_LOGGERS = ('data',)


def create_logger(output_dir: str, dist_rank: int = 0, name: str = 'fat') -> logging.Logger:
    """A logger that prints on rank 0 and writes ``log.txt`` (rank 0) in ``output_dir``; on rank 0
    the ``data`` package's lines go there too (other ranks' warnings reach stderr as before)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for library in LIBRARY_LOGGERS:
        for handler in list(logging.getLogger(library).handlers):
            logging.getLogger(library).removeHandler(handler)
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
        for library in LIBRARY_LOGGERS:
            logging.getLogger(library).setLevel(logging.INFO)
            logging.getLogger(library).addHandler(console)
            logging.getLogger(library).addHandler(file_handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger
