"""The training loop: epochs of optimizer steps with accumulation, clipping and EMA, non-finite
steps skipped and counted on the device, evaluation after every epoch, checkpoints, resume and
preemption."""
from __future__ import annotations

import datetime
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import AverageMeter, ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

import slurm
from config import scaled_lrs
from lr_scheduler import build_scheduler
from optimizer import build_optimizer
from utils import (CHECKPOINT_LAST, CheckpointError, DataError, NonFiniteLossError, Preempted, StopSignal, agree,
                   all_finite, all_reduce, atomic_write_text, autocast, broadcast_object, gather_objects,
                   is_disk_full, is_distributed, memory_used_mb, rng_state, set_rng_state)

from . import checkpoints
from .task import StatefulLoader, Task, TaskData, TrainLoader


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, loader) -> Dict[str, float]:
    """``task.evaluate`` in eval mode, under no_grad and the run's autocast."""
    model.eval()
    with autocast(task.config, task.device):
        return task.evaluate(model, loader)


def sync_batchnorm(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """BatchNorm statistics over all processes' batches on multi-GPU runs (SyncBatchNorm, CUDA only;
    on CPU each process keeps its own and rank 0's are the ones evaluated and saved). Frozen
    BatchNorms stay frozen."""
    if device.type == 'cuda' and world_size > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class BatchNormGuard:
    """Puts the BatchNorm running statistics back as they were before an optimizer step that is
    skipped as non-finite, without a device sync: a copy before the step, a select after it."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.clone() for b in self.buffers]

    def snapshot(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore_if(self, bad: torch.Tensor) -> None:
        for buffer, saved in zip(self.buffers, self.saved):
            torch.where(bad, saved, buffer, out=buffer)


@dataclass
class Progress:
    """Where training stands: what a checkpoint records beyond the weights."""
    epoch: int = 0  # the epoch in progress (or just finished)
    micro_batches: int = 0  # micro-batches of it done (an optimizer step takes TRAIN.ACCUMULATION_STEPS)
    best_metric: float = -math.inf  # the best primary metric of the run so far
    metrics: Dict[str, float] = field(default_factory=dict)  # the last evaluation
    saves: int = 0  # checkpoints written so far (by this run and those it continues)


class Trainer:
    """Trains ``model`` on ``task``'s data: the loop, evaluation after every epoch, checkpoints,
    resume and preemption."""

    def __init__(self, task: Task, data: TaskData, model: nn.Module):
        session, config = task.session, task.config
        self.task, self.data, self.config, self.session = task, data, config, session
        self.device, self.logger = session.device, session.logger
        if not isinstance(data.train, TrainLoader):
            raise TypeError(f'{type(task).__name__}.build_data gave a {type(data.train).__name__} as training data: the '
                            'engine needs an engine.TrainLoader (len, set_epoch(epoch, start_batch), iteration)')
        self.accumulation = config.TRAIN.ACCUMULATION_STEPS
        self.updates_per_epoch = len(data.train) // self.accumulation
        if self.updates_per_epoch == 0:
            raise DataError(f'{len(data.train)} batches per epoch cannot fill one optimizer step of '
                            f'{self.accumulation} accumulated micro-batches: lower TRAIN.ACCUMULATION_STEPS')
        # Micro-batches trained per epoch: a remainder that would not fill an optimizer step is left out.
        self.micro_batches_per_epoch = self.updates_per_epoch * self.accumulation
        self.model = model = sync_batchnorm(model, self.device, session.world_size)
        base_lr, warmup_lr, min_lr = scaled_lrs(config, session.world_size)
        self.logger.info(f'LR scaled to the total batch: base {base_lr:.3e}, warm-up {warmup_lr:.3e}, '
                         f'min {min_lr:.3e}')
        self.optimizer = build_optimizer(config, model, base_lr)
        self.scheduler = build_scheduler(config, self.optimizer, self.updates_per_epoch, warmup_lr, min_lr)
        # fp16 scales the loss; otherwise the scaler keeps scale 1 and only skips non-finite steps on the device.
        self.loss_scaling = self.device.type == 'cuda' and config.AMP_ENABLE and config.AMP_DTYPE == 'fp16'
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 16 if self.loss_scaling else 1.0)
        self.ema = ModelEmaV3(model, decay=config.MODEL.EMA.DECAY) if config.MODEL.EMA.ENABLE else None
        train_model = model
        if session.world_size > 1:
            train_model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == 'cuda' else None)
        self.train_model = torch.compile(train_model) if config.COMPILE else train_model
        self.bn_guard = BatchNormGuard(model) if config.TRAIN.MAX_NONFINITE_STEPS > 0 else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else float('inf')
        # Whether every loss since the last optimizer step was finite; on the device, so that checking needs no sync.
        self.loss_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.progress = Progress()
        # On the device, so that counting them needs no sync; the same on every process.
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)  # optimizer step index
        self.identity = {'architecture': checkpoints.architecture_signature(model), 'data': data.identity,
                         **task.identity()}
        self.run_keys = checkpoints.RunKeys(task.identity_sections, checkpoints.LAUNCH_KEYS + task.launch_keys)
        self.writer: Optional[SummaryWriter] = None
        self.stop: Optional[StopSignal] = None

    # --- the run ---

    def fit(self) -> Dict[str, float]:
        """Resume, then train and evaluate epoch by epoch to TRAIN.EPOCHS."""
        config, session = self.config, self.session
        self.resume()
        self._write_on_rank_0(lambda: atomic_write_text(config.dump(), os.path.join(session.out_dir, 'config.yaml')),
                              'write config.yaml', len(config.dump()))
        if session.rank == 0:
            self.writer = SummaryWriter(session.out_dir)
        self.logger.info(f'config:\n{config.dump()}')
        self.stop = StopSignal(self.logger, earlier=slurm.time_limit_signalled)
        start_time = time.time()
        try:
            while self.progress.epoch < config.TRAIN.EPOCHS:
                if not self.train_one_epoch():
                    self.save(epoch_complete=False)
                    self._preempted(f'at epoch {self.progress.epoch} step {self.progress.micro_batches}/'
                                    f'{self.micro_batches_per_epoch}')
                self.evaluate_epoch()
                self.progress.epoch, self.progress.micro_batches = self.progress.epoch + 1, 0
                if self.progress.epoch < config.TRAIN.EPOCHS and self.stop.requested():  # not once finished
                    self._preempted(f'after epoch {self.progress.epoch - 1}')
            self.logger.info(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
        finally:
            self.stop.close()
            if self.writer is not None:
                self.writer.close()
        return self.progress.metrics

    def _preempted(self, where: str) -> None:
        """Stop after the save: for Slurm's time-limit signal, requeue the job (rank 0) first."""
        signum = self.stop.agreed or self.stop.signum or signal.SIGTERM
        saved = f'saved {os.path.join(self.session.out_dir, CHECKPOINT_LAST)}'
        if signum != slurm.TIME_LIMIT_SIGNAL:
            raise Preempted(f'stopped by {signal.Signals(signum).name} {where}; {saved}. Run the same command again '
                            'to continue from there (a requeued Slurm job does).', signum)
        # Every process waits until rank 0 has requeued the job: one that exits first, not 0, may make
        # srun end the others (--kill-on-bad-exit) before the requeue.
        failed = broadcast_object(slurm.requeue() if self.session.rank == 0 else None)
        outcome = (f'could not requeue the job ({failed}); submit the same command again to continue from there'
                   if failed else f'requeued Slurm job {os.environ.get("SLURM_JOB_ID")}: it continues from there')
        self.logger.info(outcome)
        raise Preempted(f'stopped by {signal.Signals(signum).name} (the time limit is near) {where}; {saved}; '
                        f'{outcome}.', signum)

    def train_one_epoch(self) -> bool:
        """Train from ``progress.micro_batches`` to the end of ``progress.epoch``; False when a stop signal
        ended it early, at an optimizer-step boundary that ``progress.micro_batches`` records."""
        config, progress, model = self.config, self.progress, self.train_model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.data.train.set_epoch(progress.epoch, progress.micro_batches)
        batch_time, data_time = AverageMeter(), AverageMeter()
        # Running sums stay on the device; they are read (one sync) only at the print interval.
        sums: Dict[str, torch.Tensor] = {}
        norm_sum = torch.zeros((), device=self.device)
        count = norm_count = 0
        start = end = time.time()
        for idx, batch in enumerate(self.data.train, start=progress.micro_batches):
            if idx >= self.micro_batches_per_epoch:
                break
            data_time.update(time.time() - end)
            loss, parts, grad_norm = self.train_step(idx, batch)
            for name, value in {'loss': loss, **parts}.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
            count += 1
            if grad_norm is not None:
                norm_sum += torch.where(torch.isfinite(grad_norm), grad_norm, 0)
                norm_count += 1
            batch_time.update(time.time() - end)
            end = time.time()
            if idx % config.PRINT_FREQ == 0 or idx == self.micro_batches_per_epoch - 1:
                self._check_nonfinite()
                self._log_step(idx, sums, count, norm_sum, norm_count, batch_time, data_time)
                sums, count, norm_count = {}, 0, 0
                norm_sum.zero_()
            if grad_norm is not None and idx + 1 < self.micro_batches_per_epoch and self.stop.requested():
                return False
        self._check_nonfinite()
        progress.micro_batches = self.micro_batches_per_epoch
        epoch_time = time.time() - start
        self.logger.info(f'EPOCH {progress.epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}')
        if self.writer is not None:
            self.writer.add_scalar('train/epoch_time', epoch_time, progress.epoch)
        return True

    def _global_step(self) -> int:
        """Optimizer steps done so far in the run."""
        return self.progress.epoch * self.updates_per_epoch + self.progress.micro_batches // self.accumulation

    def train_step(self, idx: int, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Micro-batch ``idx`` of the epoch: the task's loss under autocast and the backward of its share
        (1 / TRAIN.ACCUMULATION_STEPS), then, when it completes an optimizer step, that step. Returns the
        detached loss, its parts and the optimizer step's grad norm (None between optimizer steps)."""
        model, update = self.train_model, (idx + 1) % self.accumulation == 0
        if self.bn_guard is not None and idx % self.accumulation == 0:
            self.bn_guard.snapshot()
        sync_grads = update or not hasattr(model, 'no_sync')
        with (nullcontext() if sync_grads else model.no_sync()), autocast(self.config, self.device):
            loss, parts = self.task.loss(model, batch)
        self.scaler.scale(loss / self.accumulation).backward()
        loss = loss.detach()
        self.loss_finite &= torch.isfinite(loss)
        if not update:
            return loss, parts, None
        grad_norm = self._optimizer_step()
        self.progress.micro_batches = idx + 1
        return loss, parts, grad_norm

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step (skipped on the device when non-finite), schedule and average; returns the grad norm."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm).detach()
        # With loss scaling an overflowing gradient is routine (the scaler backs off); only a non-finite
        # loss is then a fault. Every process agrees, so all count, restore and stop alike.
        bad = ~self.loss_finite if self.loss_scaling else ~(self.loss_finite & torch.isfinite(grad_norm))
        bad = all_reduce(bad.to(torch.int32), 'max').bool()
        step = self._global_step()
        self.nonfinite_steps += bad
        self.first_nonfinite.copy_(torch.where(bad & (self.first_nonfinite < 0), step, self.first_nonfinite))
        self.scaler.step(self.optimizer)
        self.scaler.update() if self.loss_scaling else self.scaler.update(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.bn_guard is not None:
            self.bn_guard.restore_if(bad)
        self.scheduler.step_update(step + 1)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        self.loss_finite.fill_(True)
        return grad_norm

    def _check_nonfinite(self) -> None:
        """Stop once more optimizer steps had a non-finite loss or gradient than TRAIN.MAX_NONFINITE_STEPS
        (those steps were skipped on the device, so the weights are untouched)."""
        count, limit = int(self.nonfinite_steps), self.config.TRAIN.MAX_NONFINITE_STEPS
        if count > limit:
            epoch, update = divmod(int(self.first_nonfinite), self.updates_per_epoch)
            raise NonFiniteLossError(
                f'non-finite loss or gradients at epoch {epoch} step {update * self.accumulation} ({count} '
                f'optimizer step(s) so far, TRAIN.MAX_NONFINITE_STEPS is {limit}); those steps were skipped and '
                'nothing non-finite was saved. Lower TRAIN.BASE_LR, check TRAIN.CLIP_GRAD and the data, '
                'or allow skipping with --opts TRAIN.MAX_NONFINITE_STEPS N')

    def _log_step(self, idx: int, sums: dict, count: int, norm_sum: torch.Tensor, norm_count: int,
                  batch_time: AverageMeter, data_time: AverageMeter) -> None:
        means = {name: (total / max(count, 1)).item() for name, total in sums.items()}
        grad_norm = (norm_sum / max(norm_count, 1)).item()
        lr = self.optimizer.param_groups[0]['lr']
        epoch = self.progress.epoch
        eta = datetime.timedelta(seconds=int(batch_time.avg * (self.micro_batches_per_epoch - idx - 1)))
        self.logger.info(
            f'Train: [{epoch}/{self.config.TRAIN.EPOCHS}][{idx}/{self.micro_batches_per_epoch}]\teta {eta} lr {lr:.3e}\t'
            f'time {batch_time.val:.4f} ({batch_time.avg:.4f})\tdata {data_time.val:.4f} ({data_time.avg:.4f})\t'
            + ' '.join(f'{name} {value:.4f}' for name, value in means.items())
            + f'\tgrad_norm {grad_norm:.4f}\tmem {memory_used_mb(self.device):.0f}MB')
        if self.writer is not None:
            step = epoch * self.micro_batches_per_epoch + idx
            for name, value in {**means, 'lr': lr, 'grad_norm': grad_norm, 'data_time': data_time.avg}.items():
                self.writer.add_scalar(f'train/{name}', value, step)

    def _same_buffers_everywhere(self) -> None:
        """Give every process rank 0's buffers (BatchNorm statistics): without SyncBatchNorm each process
        updated them on its own batches, and evaluation must use the ones the checkpoint stores."""
        if is_distributed():
            for module in (self.model, self.ema.module if self.ema is not None else None):
                for buffer in module.buffers() if module is not None else ():
                    torch.distributed.broadcast(buffer, 0)

    def evaluate_epoch(self) -> None:
        """Evaluate the model (and the EMA), keep the best, save."""
        progress, task = self.progress, self.task
        self._same_buffers_everywhere()
        metrics = evaluate(task, self.train_model, self.data.val)
        self.logger.info(task.summary(metrics))
        self._log_metrics('val', metrics)
        if self.ema is not None:
            ema_metrics = evaluate(task, self.ema.module, self.data.val)
            self.logger.info(f'EMA: {task.summary(ema_metrics)}')
            self._log_metrics('val_ema', ema_metrics)
        value = metrics[task.primary_metric]
        is_best = value > progress.best_metric
        progress.best_metric = max(progress.best_metric, value)
        progress.metrics = metrics
        self.logger.info(f'best {task.primary_metric}: {progress.best_metric:.4f}')
        self.save(epoch_complete=True, is_best=is_best)

    def _log_metrics(self, prefix: str, metrics: Dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f'{prefix}/{name}', value, self.progress.epoch)

    # --- checkpoints ---

    def _optimizer_params(self) -> List[str]:
        """The names of the optimizer's parameters, in the order its state dict numbers them."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group['params']]

    def state_dict(self, rng_states: list, loader_states: Optional[list]) -> dict:
        """The run's state as a checkpoint holds it (``checkpoints.RunState``)."""
        progress = self.progress
        return checkpoints.RunState(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            optimizer_params=self._optimizer_params(), scaler=self.scaler.state_dict(),
            epoch=progress.epoch, step=progress.micro_batches, steps_per_epoch=self.micro_batches_per_epoch,
            samples_per_step=self.config.DATA.BATCH_SIZE * self.session.world_size,
            best_metric=progress.best_metric, nonfinite_steps=int(self.nonfinite_steps), rng=rng_states,
            config=self.config.dump(), identity=self.identity,
            ema=self.ema.module.state_dict() if self.ema is not None else None, metrics=progress.metrics,
            first_nonfinite=int(self.first_nonfinite), loader=loader_states, saves=progress.saves,
            format=checkpoints.FORMAT_VERSION).to_dict()

    def save(self, epoch_complete: bool, is_best: bool = False) -> None:
        """Checkpoint the run: rank 0 writes, every process contributes its random state and waits for
        the write. Non-finite weights are never written: the last good checkpoint stays."""
        config, progress = self.config, self.progress
        finite = torch.tensor(int(all_finite(self.model.state_dict())), device=self.device)
        if not all_reduce(finite, 'min'):
            raise NonFiniteLossError(f'the weights or BatchNorm statistics are non-finite at epoch {progress.epoch} '
                                     f'step {progress.micro_batches}; not saving them, the last good checkpoint in '
                                     f'{self.session.out_dir} is kept')
        rng_states = gather_objects(rng_state())
        # A loader that keeps its own position (DALI's readers) saves it per process; for the others
        # the engine's position (epoch, micro-batch) is all set_epoch needs.
        train = self.data.train
        loader_states = gather_objects(train.state_dict()) if isinstance(train, StatefulLoader) else None
        progress.saves += 1
        periodic = epoch_complete and config.SAVE_FREQ > 0 and (
            (progress.epoch + 1) % config.SAVE_FREQ == 0 or progress.epoch + 1 == config.TRAIN.EPOCHS)
        state = self.state_dict(rng_states, loader_states) if self.session.rank == 0 else {}
        self._write_on_rank_0(lambda: checkpoints.write(self.session.out_dir, state, periodic, is_best, config.SAVE_KEEP,
                                                        self.logger), 'write a checkpoint', checkpoints.state_bytes(state))

    def _write_on_rank_0(self, write, what: str, size: int) -> None:
        """``write()`` on rank 0 while the others wait; a write that fails (disk full, quota, I/O
        error) stops every process with one line, and the files written before stay as they were."""
        problem = None
        if self.session.rank == 0:
            try:
                write()
            except OSError as error:
                space = ''
                if is_disk_full(error):
                    free = shutil.disk_usage(self.session.out_dir).free
                    space = f' (it needs about {size / 2 ** 20:.0f} MB, {free / 2 ** 20:.0f} MB are free)'
                problem = CheckpointError(f'cannot {what} in {self.session.out_dir}: {error.strerror}{space}; '
                                          'the files written before are kept. Make room (or fix the folder) and run '
                                          'the same command again')
        agree(problem)

    def resume(self) -> None:
        """Continue from the run folder's newest checkpoint (TRAIN.AUTO_RESUME) or MODEL.RESUME,
        whichever is further in training. Rank 0 chooses and every process loads the same file; a
        process that sees a newer checkpoint than rank 0 chose stops the run (OUTPUT is not shared).
        The schedule, LR scaling and the rest follow the current config, and the keys that changed
        are logged."""
        session, config = self.session, self.config
        found = checkpoints.survey(session.out_dir, self.identity, config, self.run_keys)
        choice, problem = None, None
        if session.rank == 0:
            for path, why in found.unusable:
                self.logger.warning(f'skipping {path}: {why}')
            try:
                choice = checkpoints.choose(found, session.out_dir, self.identity, config, self.logger, self.run_keys)
            except CheckpointError as error:
                problem = error
        agree(problem)
        path, chosen_at = broadcast_object(choice)
        rank_0_newest = broadcast_object(found.newest[0] if found.newest else None)
        agree(checkpoints.check_one_folder(found, rank_0_newest, session.out_dir, session.rank))
        first_epoch = chosen_at[0] if chosen_at else 0
        self._write_on_rank_0(lambda: checkpoints.set_aside_unusable(found, first_epoch, config.TRAIN.EPOCHS, self.logger),
                              'set the unreadable checkpoints aside', 0)
        self.progress.best_metric = broadcast_object(found.best_seen)
        self.progress.saves = broadcast_object(found.saves)
        if path:
            self.load_state_dict(checkpoints.load_agreed(path), path)
        if self.progress.micro_batches >= self.micro_batches_per_epoch:
            self.progress.epoch, self.progress.micro_batches = self.progress.epoch + 1, 0
        self.scheduler.step_update(self._global_step())

    def load_state_dict(self, checkpoint: dict, path: str) -> None:
        """Restore the run from ``checkpoint``: weights and optimizer state from the file; optimizer
        groups, hyper-parameters and LR schedule from the current config."""
        progress, session = self.progress, self.session
        checkpoints.load_weights(self.model, checkpoint['model'], path)
        groups = self.optimizer.state_dict()['param_groups']
        self.optimizer.load_state_dict({'state': checkpoints.optimizer_state_by_name(checkpoint, self._optimizer_params()),
                                        'param_groups': groups})
        if self.loss_scaling:
            self.scaler.load_state_dict(checkpoint['scaler'])
        if self.ema is not None:  # newly enabled: it starts from the resumed weights
            checkpoints.load_weights(self.ema.module, checkpoint['ema'] if checkpoint['ema'] is not None
                                     else self.model.state_dict(), f'{path} (its EMA weights)')
        progress.epoch, progress.micro_batches = checkpoints.resume_position(
            checkpoint, self.config.DATA.BATCH_SIZE * session.world_size, self.micro_batches_per_epoch, self.accumulation,
            self.logger)
        progress.best_metric = max(progress.best_metric, checkpoint['best_metric'])
        progress.saves = max(progress.saves, checkpoint['saves'])
        progress.metrics = checkpoint['metrics']
        self.nonfinite_steps.fill_(checkpoint['nonfinite_steps'])
        self.first_nonfinite.fill_(checkpoint['first_nonfinite'])
        if checkpoint['identity']['data'] != self.identity['data']:
            self.logger.warning(f'{path} was trained on other data ({self.identity["data"]} now); continuing as asked')
        if isinstance(self.data.train, StatefulLoader):
            states = checkpoint['loader']
            if states is not None and len(states) == session.world_size:
                self.data.train.load_state_dict(states[session.rank])
            else:
                self.logger.warning(f'{path} holds no data-loader position for {session.world_size} process(es): '
                                    f'the rest of epoch {progress.epoch} is read in a new order')
        rng_problem = checkpoints.describe_rng(checkpoint, session.world_size)
        if rng_problem:
            self.logger.warning(f'{path}: {rng_problem}')
        else:
            set_rng_state(checkpoint['rng'][session.rank])
        changes = checkpoints.config_changes(checkpoint['config'], self.config, self.run_keys.launch_keys)
        if changes:
            self.logger.info('the config differs from the checkpoint\'s; the current one applies: ' + '; '.join(changes))
        self.logger.info(f'resumed from {path} (epoch {progress.epoch}, {progress.micro_batches} steps done, '
                         f'best {self.task.primary_metric} {progress.best_metric:.4f})')
