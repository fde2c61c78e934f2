"""Runs under Slurm: the process group from Slurm's allocation, the job's identity for the log, and
requeueing the job.

Two launch forms read Slurm's allocation (``slurm/train.sbatch`` uses both):
- ``srun python main.py ...``, one process per task: rank, world size and local rank are Slurm's task
  numbers, and the rendezvous is the first node of the step (:func:`torch_environment`);
- ``srun torchrun ...``, one task per node that starts a process per GPU: torchrun sets the process
  group itself, from the rendezvous address the script takes from :func:`first_node_address`.
"""
from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
from typing import Dict, List, Mapping, Optional

# Rendezvous ports are PORT_BASE + (a job's number) % PORT_RANGE: below Linux's ephemeral ports (32768 on),
# which outgoing connections hold.
PORT_BASE, PORT_RANGE = 10000, 20000

# Slurm's warning ahead of a job's time limit (train.sbatch's --signal): the run saves and requeues the job.
TIME_LIMIT_SIGNAL = signal.SIGUSR1
_time_limit_signalled: List[int] = []


def record_time_limit_signal() -> None:
    """From now on (once per process), remember a :data:`TIME_LIMIT_SIGNAL` for the trainer, which asks
    :func:`time_limit_signalled` when it starts listening: its default action would end the process
    at once, and it may come while the run still starts (``python -m slurm.run`` records it before
    the imports that take seconds)."""
    if not isinstance(signal.getsignal(TIME_LIMIT_SIGNAL), _Recorder):
        signal.signal(TIME_LIMIT_SIGNAL, _Recorder())


class _Recorder:
    def __call__(self, signum, frame) -> None:
        _time_limit_signalled.append(signum)


def time_limit_signalled() -> int:
    """:data:`TIME_LIMIT_SIGNAL` when it came while recorded, else 0."""
    return TIME_LIMIT_SIGNAL if _time_limit_signalled else 0


def expand_hostlist(hostlist: str) -> List[str]:
    """The node names of a Slurm hostlist: ``gpu[01-04,07],cpu3`` -> gpu01 .. gpu04, gpu07, cpu3;
    several bracket groups in one name multiply (``a[1-2]-ib[3-4]``); zero padding is kept."""
    items = re.findall(r'(?:[^,\[\]]|\[[^\[\]]*\])+', hostlist)
    if ','.join(items) != hostlist:
        raise ValueError(f'{hostlist!r} is not a Slurm hostlist (unbalanced brackets)')
    names = []
    for item in items:
        parts = re.split(r'\[([^\]]*)\]', item)  # text, ranges, text, ranges, ..., text
        choices = [[parts[0]]]
        for ranges, text in zip(parts[1::2], parts[2::2]):
            choices.append([number + text for number in _expand_ranges(ranges, hostlist)])
        names.extend(''.join(combination) for combination in itertools.product(*choices))
    return names


def _expand_ranges(ranges: str, hostlist: str) -> List[str]:
    numbers = []
    for piece in ranges.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', piece.strip())
        if not match:
            raise ValueError(f'{hostlist!r} is not a Slurm hostlist ({piece!r} in brackets)')
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f'{hostlist!r} is not a Slurm hostlist (range {piece!r} runs backwards)')
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


def node_address(name: str) -> str:
    """The address Slurm reaches node ``name`` at (its ``NodeAddr``, which need not resolve as a name
    in DNS); ``name`` itself where ``scontrol`` cannot say."""
    try:
        shown = subprocess.run(['scontrol', 'show', '--oneliner', 'node', name], capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return name
    match = re.search(r'(?:^|\s)NodeAddr=(\S+)', shown)
    return match.group(1) if match else name


def first_node_address(environ: Mapping[str, str] = os.environ) -> str:
    """The address of the first node of this job step (or of the job, in its batch script)."""
    nodelist = environ.get('SLURM_STEP_NODELIST') or environ['SLURM_JOB_NODELIST']
    return node_address(expand_hostlist(nodelist)[0])


def rendezvous_port(environ: Mapping[str, str] = os.environ) -> int:
    """A port for this job's rendezvous, the same in all its tasks: MASTER_PORT where set, else one
    from the job's number, so that jobs sharing a node do not collide."""
    if environ.get('MASTER_PORT'):
        return int(environ['MASTER_PORT'])
    return PORT_BASE + int(environ['SLURM_JOB_ID']) % PORT_RANGE


def _tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on the ``node``-th node of Slurm's ``2(x3),1`` form (2 on each of 3 nodes, then 1)."""
    counts = []
    for piece in tasks_per_node.split(','):
        match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', piece.strip())
        if not match:
            raise ValueError(f'unexpected SLURM_STEP_TASKS_PER_NODE {tasks_per_node!r}')
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts[node]


def torch_environment(environ: Mapping[str, str] = os.environ, address=first_node_address) -> Dict[str, str]:
    """The variables torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) for a process that ``srun`` started as one task of a step, from Slurm's
    own; empty outside a job step or where a launcher (torchrun) has set them already."""
    if 'RANK' in environ or 'SLURM_STEP_NUM_TASKS' not in environ or 'SLURM_PROCID' not in environ:
        return {}
    node = int(environ.get('SLURM_NODEID', 0))
    return {'RANK': environ['SLURM_PROCID'], 'WORLD_SIZE': environ['SLURM_STEP_NUM_TASKS'],
            'LOCAL_RANK': environ.get('SLURM_LOCALID', '0'),
            'LOCAL_WORLD_SIZE': str(_tasks_on_node(environ.get('SLURM_STEP_TASKS_PER_NODE', '1'), node)),
            'MASTER_ADDR': environ.get('MASTER_ADDR') or address(environ),
            'MASTER_PORT': str(rendezvous_port(environ))}


def task_has_own_cpus(environ: Mapping[str, str] = os.environ, cpus: Optional[int] = None) -> bool:
    """Whether Slurm bound this process, one task of a step, to CPUs of its own (fewer than the job has
    on this node; srun binds tasks where the cluster's task plugin does), so that the other tasks on
    the node do not share them. Never for the processes torchrun starts, which share their task's."""
    if 'SLURM_STEP_ID' not in environ or 'TORCHELASTIC_RUN_ID' in environ or not environ.get('SLURM_CPUS_ON_NODE'):
        return False
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return cpus < int(environ['SLURM_CPUS_ON_NODE'])


def job_description(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """'Slurm job 42 (fat) on n[1-2], restart 2', or None outside a Slurm job."""
    if 'SLURM_JOB_ID' not in environ:
        return None
    return (f'Slurm job {environ["SLURM_JOB_ID"]} ({environ.get("SLURM_JOB_NAME", "?")}) on '
            f'{environ.get("SLURM_JOB_NODELIST", "?")}, restart {environ.get("SLURM_RESTART_COUNT", "0")}')


def requeue(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Put this Slurm job back in the queue (``scontrol requeue``): it starts again later, under the same
    job number, and continues from the run folder. None when it was requeued, else why not."""
    job = environ.get('SLURM_JOB_ID')
    if not job:
        return 'not a Slurm job'
    try:
        done = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f'scontrol requeue {job} failed: {error}'
    if done.returncode:
        return f'scontrol requeue {job} failed: {(done.stderr or done.stdout).strip() or f"exit {done.returncode}"}'
    return None
