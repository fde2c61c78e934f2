"""Slurm: the launch script (slurm/train.sbatch) and the engine under a real Slurm on this machine, and
the pieces of slurm/ that a 2-node test cannot reach (hostlist forms, the rendezvous).

The real-Slurm tests start munged (when it is not running), slurmctld and two slurmd (nodes n1 and n2
on this machine, each with its own port) from a private configuration, and stop what they started by
PID. Without Slurm they skip; under CI (CI=true) that is a failure, so CI cannot stop testing it."""
import pytest
import torch

from helpers import ROOT, TINY_OPTS, make_image_folder, run_main
import slurm


@pytest.mark.parametrize('hostlist, names', [
    ('n1', ['n1']),
    ('n[1-2]', ['n1', 'n2']),
    ('gpu[01-04,07]', ['gpu01', 'gpu02', 'gpu03', 'gpu04', 'gpu07']),
    ('gpu[08-10],cpu3', ['gpu08', 'gpu09', 'gpu10', 'cpu3']),
    ('a[1-2]-ib[3-4]', ['a1-ib3', 'a1-ib4', 'a2-ib3', 'a2-ib4']),
    ('node[9-11]', ['node9', 'node10', 'node11']),
    ('x-[1,3],y', ['x-1', 'x-3', 'y']),
])
def test_hostlists_expand_as_slurm_expands_them(hostlist, names):
    # The same expansions `scontrol show hostnames` gives. Mutations caught: zero padding dropped;
    # commas inside brackets taken as separators; one bracket group only.
    assert slurm.expand_hostlist(hostlist) == names


@pytest.mark.parametrize('hostlist', ['n[2-1]', 'n[a-b]', 'n[1-'])
def test_a_hostlist_that_is_not_one_is_named(hostlist):
    with pytest.raises(ValueError, match='is not a Slurm hostlist'):
        slurm.expand_hostlist(hostlist)


STEP = {'SLURM_JOB_ID': '4242', 'SLURM_PROCID': '3', 'SLURM_LOCALID': '1', 'SLURM_NODEID': '1',
        'SLURM_STEP_NUM_TASKS': '5', 'SLURM_STEP_TASKS_PER_NODE': '2(x2),1', 'SLURM_STEP_NODELIST': 'gpu[07-09]',
        'SLURM_JOB_NODELIST': 'gpu[07-09]'}


def test_a_task_of_an_srun_step_gets_its_rank_and_the_first_nodes_address():
    # Mutations caught: the job's node list taken before the step's; tasks per node read from the wrong node.
    asked = []
    env = slurm.torch_environment(STEP, address=lambda environ: asked.append(slurm.expand_hostlist(
        environ['SLURM_STEP_NODELIST'])[0]) or '10.0.0.7')
    assert env == {'RANK': '3', 'WORLD_SIZE': '5', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2',
                   'MASTER_ADDR': '10.0.0.7', 'MASTER_PORT': str(10000 + 4242)}
    assert asked == ['gpu07']
    assert slurm.torch_environment({**STEP, 'SLURM_NODEID': '2'}, address=lambda e: 'x')['LOCAL_WORLD_SIZE'] == '1'


def test_launchers_and_the_batch_script_keep_their_own_settings():
    # torchrun has set the process group; the batch script is no step; MASTER_* given are kept.
    assert slurm.torch_environment({**STEP, 'RANK': '0'}) == {}
    assert slurm.torch_environment({k: v for k, v in STEP.items() if not k.startswith('SLURM_STEP')}) == {}
    given = slurm.torch_environment({**STEP, 'MASTER_ADDR': 'head', 'MASTER_PORT': '29500'}, address=None)
    assert (given['MASTER_ADDR'], given['MASTER_PORT']) == ('head', '29500')


def test_jobs_get_ports_apart_and_every_task_of_a_job_the_same():
    ports = {slurm.rendezvous_port({'SLURM_JOB_ID': str(job)}) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= port < 30000 for port in ports)


def test_only_a_task_bound_to_cpus_of_its_own_keeps_them_all():
    # 8 tasks with 8 CPUs each on a 64-CPU allocation; unbound tasks (task/none) see all 64 and share
    # them; torchrun's processes share their task's. Mutation caught: every Slurm task taken as bound.
    task = {'SLURM_STEP_ID': '0', 'SLURM_CPUS_ON_NODE': '64'}
    assert slurm.task_has_own_cpus(task, cpus=8)
    assert not slurm.task_has_own_cpus(task, cpus=64)
    assert not slurm.task_has_own_cpus({**task, 'TORCHELASTIC_RUN_ID': '42'}, cpus=8)
    assert not slurm.task_has_own_cpus({'SLURM_CPUS_ON_NODE': '64'}, cpus=8)  # the batch script


def test_a_task_that_sees_one_gpu_uses_it_and_too_few_gpus_are_one_line(monkeypatch):
    # --gpus-per-task 1 gives each task its own GPU as cuda:0 whatever its local rank. Mutations caught:
    # cuda:LOCAL_RANK taken always (invalid device ordinal); a rank past the visible GPUs let through.
    import utils
    monkeypatch.setenv('LOCAL_RANK', '3')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert utils._local_gpu() == 0
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    assert utils._local_gpu() == 3
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5')
    with pytest.raises(utils.UserInputError, match=r'local rank 3, but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=4,5\)'):
        utils._local_gpu()


def test_the_node_address_is_slurms_and_falls_back_to_the_name(tmp_path, monkeypatch):
    # A fake scontrol on PATH, as the real one prints a node; then none at all.
    fake = tmp_path / 'scontrol'
    fake.write_text('#!/bin/sh\necho "NodeName=$4 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=$4 Version=22.05.8"\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}:/usr/bin:/bin')
    assert slurm.node_address('gpu07') == '10.1.2.3'
    fake.unlink()
    monkeypatch.setenv('PATH', str(tmp_path))
    assert slurm.node_address('gpu07') == 'gpu07'


# --- a real Slurm of two nodes on this machine -------------------------------------------------------

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path



DAEMONS = ('munge', 'munged', 'slurmctld', 'slurmd', 'sbatch', 'scontrol', 'srun', 'scancel')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _no_slurm(reason: str):
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{reason}: the Slurm tests cannot run, and CI must not skip them')
    pytest.skip(reason)


class Cluster:
    """Slurm's client commands against the private configuration, and what a test waits for."""

    def __init__(self, conf: Path):
        self.env = dict(os.environ, SLURM_CONF=str(conf), OMP_NUM_THREADS='1',
                        PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}')

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise AssertionError(f'{" ".join(command)}: {done.stderr or done.stdout}')
        return done.stdout

    def sbatch(self, *args, cwd: Path = ROOT) -> str:
        out = subprocess.run(['sbatch', '--parsable', *map(str, args)], env=self.env, cwd=cwd, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(';')[0]

    def job(self, job_id: str) -> dict:
        return dict(re.findall(r'(\w+)=(\S*)', self.run('scontrol', 'show', '--oneliner', 'job', job_id)))

    def wait(self, job_id: str, until, what: str, timeout: float = 240) -> dict:
        """The job's fields once ``until(fields)`` holds, releasing a requeued job at once (Slurm holds
        one back for a while, BeginTime)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            fields = self.job(job_id)
            if until(fields):
                return fields
            if fields.get('JobState') == 'PENDING' and fields.get('Reason') == 'BeginTime':
                self.run('scontrol', 'update', f'JobId={job_id}', 'StartTime=now', check=False)
            time.sleep(0.5)
        raise AssertionError(f'job {job_id} never {what}: {self.job(job_id)}')


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    """munged (unless running), slurmctld and two slurmd, nodes n1 and n2 of one CPU each on this
    machine with their own ports; stopped by PID afterwards, with what they started."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        _no_slurm(f'Slurm is not installed ({", ".join(missing)} missing; apt-get install slurm-wlm munge)')
    if os.geteuid() != 0:
        _no_slurm('slurmd must run as root here')
    root = tmp_path_factory.mktemp('slurm')
    host = socket.gethostname()
    ports = [_free_port() for _ in range(3)]
    conf = root / 'slurm.conf'
    conf.write_text(f"""ClusterName=fattest
SlurmctldHost={host}
SlurmctldPort={ports[0]}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmUser=root
SlurmdUser=root
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")
    for folder in ('state', 'spool'):
        (root / folder).mkdir()
    pid_files = []
    if subprocess.run(['munge', '-n'], capture_output=True).returncode:  # no munged answers
        Path('/run/munge').mkdir(exist_ok=True)
        shutil.chown('/run/munge', 'munge', 'munge')
        subprocess.run(['munged', '--force'], check=True, capture_output=True)
        pid_files.append(Path('/run/munge/munged.pid'))
    cluster = Cluster(conf)
    try:
        subprocess.run(['slurmctld', '-f', str(conf)], env=cluster.env, check=True, capture_output=True)
        pid_files.append(root / 'slurmctld.pid')
        for node in ('n1', 'n2'):
            subprocess.run(['slurmd', '-f', str(conf), '-N', node], env=cluster.env, check=True, capture_output=True)
            pid_files.append(root / f'slurmd-{node}.pid')
        deadline = time.time() + 30
        while cluster.run('sinfo', '--noheader', '-o', '%D %t', check=False).split() != ['2', 'idle']:
            assert time.time() < deadline, cluster.run('sinfo', check=False)
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.run('scancel', '--user', 'root', check=False)
        for pid_file in reversed(pid_files):
            if pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)


def digits_run(output: Path, *opts: str) -> list:
    """main.py's arguments for the digits on a tiny FAT at 32 px, batch 8 per process (87 steps per
    epoch over 2 processes), one loader worker each (Slurm signals it too)."""
    return ['--cfg', 'configs/digits_fat_b0.yaml', '--batch-size', '8', '--output', output, '--opts', *TINY_OPTS,
            'DATA.NUM_WORKERS', '1', 'PRINT_FREQ', '5', *opts]


def run_folder(output: Path) -> Path:
    return output / 'fat_b0_digits' / 'default'


def wait_for_text(path: Path, text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.time() < deadline, f'{text!r} never appeared in {path}'
        time.sleep(0.05)


def weights(output: Path) -> dict:
    return torch.load(run_folder(output) / 'ckpt_last.pth', weights_only=True)['model']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory) -> dict:
    """The digits run under torchrun with 2 processes, uninterrupted: its final weights."""
    out = tmp_path_factory.mktemp('torchrun')
    run_main(*digits_run(out), nproc=2)
    return weights(out)


def test_a_two_node_job_requeued_twice_mid_epoch_ends_as_the_uninterrupted_torchrun_run(cluster, uninterrupted,
                                                                                        tmp_path):
    # Each requeue SIGTERMs every process of the job (loader workers included). Mutations caught: Slurm's
    # task numbers not read (each task trained alone as rank 0); loader workers dying of the signal (no save).
    out = tmp_path / 'out'
    job = cluster.sbatch('--nodes', '2', '--ntasks-per-node', '1', f'--output={tmp_path}/%j.out', 'slurm/train.sbatch',
                         '--device', 'cpu', *digits_run(out))
    log = run_folder(out) / 'log.txt'
    for restarts, step in ((0, 20), (1, 50)):
        wait_for_text(log, f'Train: [0/1][{step}/87]')
        cluster.run('scontrol', 'requeue', job)
        cluster.wait(job, lambda fields: int(fields['Restarts']) == restarts + 1 and fields['JobState'] == 'RUNNING',
                     'started again')
    done = cluster.wait(job, lambda fields: fields['JobState'] in ('COMPLETED', 'FAILED'), 'ended')
    output = (tmp_path / f'{job}.out').read_text()
    assert done['JobState'] == 'COMPLETED' and done['Restarts'] == '2', output[-3000:]
    stops = re.findall(r'stopped by SIGTERM at epoch 0 step (\d+)/87', output)
    assert len(stops) == 2 and 20 <= int(stops[0]) < 50 <= int(stops[1]) < 87, output[-3000:]
    assert log.read_text().count(f'Slurm job {job} (fat) on n[1-2], restart') == 3
    assert '2 process(es) on cpu' in log.read_text()
    for key, value in weights(out).items():
        assert torch.equal(value, uninterrupted[key]), key


def test_ahead_of_the_time_limit_the_job_saves_requeues_itself_and_completes(cluster, tmp_path):
    # A two-minute limit and the signal 100 s ahead: Slurm sends it 20 to 50 s in (its time checks run
    # about every 30 s), once the processes listen (sooner, it could end a Python still starting, or find
    # no job step yet) and while this run needs more. Mutations caught: SIGUSR1 left to its default (the
    # job died, not requeued); no requeue after the save (the job ended at its limit).
    out = tmp_path / 'out'
    job = cluster.sbatch('--nodes', '2', '--ntasks-per-node', '1', '--time=2', '--signal=USR1@100',
                         f'--output={tmp_path}/%j.out', 'slurm/train.sbatch', '--device', 'cpu',
                         *digits_run(out, 'TRAIN.EPOCHS', '8'))
    # Back in the queue (Slurm holds it there for a while): its processes have ended.
    cluster.wait(job, lambda fields: int(fields['Restarts']) >= 1 and fields['JobState'] == 'PENDING', 'requeued itself',
                 timeout=120)
    output = (tmp_path / f'{job}.out').read_text()
    assert re.search(rf'stopped by SIGUSR1 \(the time limit is near\) (at|after) epoch \d+.*; saved .*; requeued '
                     rf'Slurm job {job}: it continues from there\.', output), output[-3000:]
    cluster.run('scontrol', 'update', f'JobId={job}', 'TimeLimit=10')  # the rest of the run fits in one go
    done = cluster.wait(job, lambda fields: fields['JobState'] in ('COMPLETED', 'FAILED'), 'ended')
    assert done['JobState'] == 'COMPLETED' and done['Restarts'] == '1', (tmp_path / f'{job}.out').read_text()[-3000:]
    assert torch.load(run_folder(out) / 'ckpt_last.pth', weights_only=True)['epoch'] == 7
    log = (run_folder(out) / 'log.txt').read_text()
    assert 'received SIGUSR1 (Slurm: the time limit is near)' in log and f'requeued Slurm job {job}: it continues from there\n' in log
    assert f'Slurm job {job} (fat) on n[1-2], restart 1' in log


@pytest.mark.parametrize('processes_per_node', [None, '2'], ids=['task-per-process', 'torchrun-per-node'])
def test_a_job_with_bad_input_fails_once_and_is_not_requeued(cluster, tmp_path, processes_per_node):
    # Detection's entry point, as `-m detection.train`, with an architecture that does not exist; in
    # both launch forms. Mutations caught: every task printing the error; torchrun's exit 1 passed on.
    export = f'--export=ALL,FAT_PROCS_PER_NODE={processes_per_node}' if processes_per_node else '--export=ALL'
    tasks = ('--nodes', '1', '--ntasks-per-node', '1') if processes_per_node else ('--ntasks', '2')
    job = cluster.sbatch(*tasks, export,
                         f'--output={tmp_path}/%j.out', 'slurm/train.sbatch', '-m', 'detection.train',
                         '--cfg', 'detection/configs/digits_retinanet_fat_b0.yaml', '--device', 'cpu',
                         '--output', tmp_path / 'out', '--opts', 'DET.ARCH', 'yolo')
    done = cluster.wait(job, lambda fields: fields['JobState'] in ('COMPLETED', 'FAILED'), 'ended')
    output = (tmp_path / f'{job}.out').read_text()
    assert done['JobState'] == 'FAILED' and done['ExitCode'] == '2:0' and done['Restarts'] == '0', output
    assert [line for line in output.splitlines() if line.startswith('error:')] == [
        "error: command line: DET.ARCH is 'yolo'; choose one of 'retinanet', 'maskrcnn'"], output
    time.sleep(3)
    assert cluster.job(job)['JobState'] == 'FAILED', 'not requeued'


def test_one_task_per_node_starts_a_process_per_gpu_with_torchrun(cluster, tmp_path):
    # 2 nodes, one task each, whose torchrun starts 2 processes (FAT_PROCS_PER_NODE stands in for a
    # node's GPUs on this CPU machine). Mutations caught: a node rank not taken per node (both nodes
    # rank 0: the rendezvous never completes); the torchrun form chosen by tasks per node alone.
    data = make_image_folder(tmp_path / 'data', classes=3, train_per_class=8, val_per_class=3)
    job = cluster.sbatch('--nodes', '2', '--ntasks-per-node', '1', '--export=ALL,FAT_PROCS_PER_NODE=2',
                         f'--output={tmp_path}/%j.out', 'slurm/train.sbatch', '--device', 'cpu', '--data-path', data,
                         '--output', tmp_path / 'out', '--batch-size', '4', '--opts', *TINY_OPTS)
    done = cluster.wait(job, lambda fields: fields['JobState'] in ('COMPLETED', 'FAILED'), 'ended')
    log = (tmp_path / 'out' / 'fat_b0' / 'default' / 'log.txt').read_text()
    assert done['JobState'] == 'COMPLETED', (tmp_path / f'{job}.out').read_text()[-3000:]
    assert '4 process(es) on cpu' in log and 'Accuracy of the network on the 9 test images' in log
