"""``python -m slurm.run main.py ARGS`` or ``python -m slurm.run -m MODULE ARGS``: run the entry point as
``python`` would, with Slurm's time-limit signal recorded from the first moment: the imports of an entry
point take seconds, and the signal's default action would end the process (train.sbatch uses it).

Run as ``-m torch.distributed.run``, torchrun's failures end it with the exit code of the process that
failed (128 + signal for a signal), as the one-process-per-task form ends, rather than with torchrun's
1 after a traceback: the job's exit code says whether the run met bad input (2) or was stopped."""
import os
import runpy
import signal
import sys

import slurm


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # a process killed by signal N has exit code -N


def main(argv: list) -> None:
    slurm.record_time_limit_signal()
    if argv[:1] == ['-m'] and len(argv) > 1:
        sys.argv = [argv[1], *argv[2:]]
        if argv[1] == 'torch.distributed.run':
            _run_torchrun()
        else:
            runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
    elif argv:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python SCRIPT` puts it
        runpy.run_path(argv[0], run_name='__main__')
    else:
        sys.exit('usage: python -m slurm.run SCRIPT [ARGS] | -m MODULE [ARGS]')


def _run_torchrun() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        runpy.run_module('torch.distributed.run', run_name='__main__', alter_sys=True)
    except ChildFailedError as failed:
        # torchrun SIGTERMs the other processes once one has failed: the failure is the others' codes.
        codes = {rank: _exit_code(failure.exitcode) for rank, failure in failed.failures.items()}
        stopped = 128 + signal.SIGTERM
        code = max([code for code in codes.values() if code != stopped] or [stopped])
        print(f'torchrun: exit code {code} (' + ', '.join(f'rank {rank}: {code}' for rank, code in sorted(codes.items()))
              + ')', file=sys.stderr)
        sys.exit(code)
    except SignalException as stopped:
        sys.exit(128 + int(stopped.sigval))


if __name__ == '__main__':
    main(sys.argv[1:])
