"""Runs the engine's multi-process paths under torchrun with a view that differs per process, as
nodes of a cluster see different things. Used by test_dependability.py:

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/engine_driver.py SCENARIO BASE_DIR DATA_DIR

Every process prints one line ``rank R: ...`` with what it ended with.

- ``resume-follow``: process r's run folder is BASE/rank{r}; rank 0's holds a newer checkpoint than
  rank 1's. Every process must resume rank 0's choice.
- ``resume-unreadable``: the run folder is relative and each process works in BASE/rank{r}; rank 1's
  copy of the chosen file is torn. Every process must stop with the same error naming the file.
- ``nonfinite-fp16``: loss scaling as under fp16, and only rank 1's loss turns non-finite at its
  second step. Every process must count the step and stop together.

Two scenarios run the entry point itself (``utils.run_entry_point``), whose output is the claim:

- ``output-one-rank``: process r's OUTPUT is BASE/rank{r}; rank 1's cannot be written.
- ``train-per-rank``: process r trains in BASE/rank{r} (a folder on each node's own disk).
- ``data-per-rank``: process r reads DATA/rank{r} (each node's own copy of the data set).

- ``timeout``: DIST_TIMEOUT 0.1 minutes. Rank 1 prepares its data 8 s longer than rank 0 (a node
  with a cold cache): training must go on, with rank 0 saying whom it waits for. Then rank 1 comes
  to a barrier 8 s late: rank 0 must give up after about 6 s and print how long it waited.
"""
import os
import sys
import time
from argparse import Namespace

import torch

from classification import Classification, get_config
import engine
import utils
from utils import ReportedError, StopSignal, note_progress, run_entry_point

TINY_OPTS = ['MODEL.FAT.EMBED_DIMS', '[8, 16, 16, 16]', 'MODEL.FAT.DEPTHS', '[1, 1, 1, 1]',
             'MODEL.FAT.NUM_HEADS', '[1, 1, 1, 1]', 'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0',
             'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'PRINT_FREQ', '2', 'AUG.AUTO_AUGMENT', 'none',
             'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'AUG.REPROB', '0.0', 'DATA.BATCH_SIZE', '4', 'DEVICE', 'cpu']


class NonFiniteOnRank1(Classification):
    """Classification whose loss is non-finite on rank 1 at its second step."""

    calls = 0

    def loss(self, model, batch):
        loss, parts = super().loss(model, batch)
        self.calls += 1
        if self.session.rank == 1 and self.calls == 2:
            loss = loss * float('nan')
        return loss, parts


class SlowDataOnRank1(Classification):
    """Classification whose data take rank 1 8 s longer to prepare."""

    def build_data(self):
        if self.session.rank == 1:
            note_progress('fetching shard 3 of 7')
            time.sleep(8)
        return super().build_data()


def trainer(output: str, data: str, task_class=Classification, *opts: str) -> engine.Trainer:
    config = config_of(output, data, *opts)
    task = task_class(engine.start(config))
    data = task.build_data()
    return engine.Trainer(task, data, task.build_model())


def config_of(output: str, data: str, *opts: str):
    return get_config(Namespace(cfg=None, opts=[*TINY_OPTS, 'OUTPUT', output, 'DATA.DATA_PATH', data, *opts]))


def main(scenario: str, base: str, data: str) -> None:
    rank = int(os.environ['RANK'])
    if scenario in ('output-one-rank', 'train-per-rank', 'data-per-rank'):
        if scenario == 'data-per-rank':
            data = os.path.join(data, f'rank{rank}')
        config = config_of(os.path.join(base, f'rank{rank}'), data, 'TRAIN.EPOCHS', '2')
        run_entry_point(lambda: engine.train_or_evaluate(Classification(engine.start(config))))
        print(f'rank {rank}: finished', flush=True)
        return
    if scenario == 'timeout':
        utils.PREPARE_REPORT_SECONDS = 3
        task = SlowDataOnRank1(engine.start(config_of(os.path.join(base, 'run'), data, 'DIST_TIMEOUT', '0.1')))
        engine.train_or_evaluate(task)
        print(f'rank {rank}: trained', flush=True)
        started = time.time()
        if rank == 1:
            time.sleep(8)
        try:
            torch.distributed.barrier()
            print(f'rank {rank}: barrier passed after {time.time() - started:.0f} s', flush=True)
        except RuntimeError:
            print(f'rank {rank}: barrier failed after {time.time() - started:.0f} s', flush=True)
        return
    try:
        if scenario == 'resume-follow':
            run = trainer(os.path.join(base, f'rank{rank}'), data)
            run.resume()
            print(f'rank {rank}: resumed epoch {run.progress.epoch}', flush=True)
        elif scenario == 'resume-unreadable':
            os.chdir(os.path.join(base, f'rank{rank}'))
            trainer('out', data).resume()
            print(f'rank {rank}: resumed', flush=True)
        elif scenario == 'nonfinite-fp16':
            run = trainer(os.path.join(base, 'run'), data, NonFiniteOnRank1)
            run.loss_scaling = True
            run.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)
            run.stop = StopSignal(run.logger)
            try:
                run.train_one_epoch()
            finally:
                run.stop.close()
            print(f'rank {rank}: finished the epoch', flush=True)
    except ReportedError as error:
        print(f'rank {rank}: {type(error).__name__}: {error}', flush=True)
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(*sys.argv[1:4])
