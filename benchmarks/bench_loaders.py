"""Training data loaders: steady-state images per second with FAT-B0's training transforms, and how many
CPU cores each needs to keep one GPU fed.

The data: ImageNet-like JPEGs made on first use and kept in ``--cache`` (reused while the parameters
match): ``--images`` training images (default 2000) over ``--classes`` class folders (10), plus a small
val/, 500x375 pixels at JPEG quality 90. Their content is photo-like (smooth colour fields, shapes, and
luminance texture over several scales), so that they are about as large as ImageNet's photos (around
115 KB; the run prints the mean) and cost as much to decode. They are then converted to shards with
``python -m data.shards``'s ``convert`` (``--shard-mb``, 32 MB: several shards).

The transforms are those of configs/fat_b0_224.yaml (``--cfg``): RandomResizedCrop 224 (scale
0.08-1, bicubic), horizontal flip, RandAugment rand-m9-mstd0.5-inc1, normalisation, random erasing
0.25 (pixel); batch ``DATA.BATCH_SIZE`` (128). The loaders:

    folder       this repo's loader: classification.data.build_dataset('train', root, config) and
                 build_train_loader (PyTorch DataLoader, DATA.NUM_WORKERS worker processes, PIL
                 decoding, timm transforms, per-sample seeding)
    shards       the same reading the shards (build_dataset(..., shards=ShardSet(shard_dir)))
    timm         timm's own: timm.data.create_dataset('', root=train/) + create_loader with the same
                 transforms (use_prefetcher=False, so random erasing runs in the workers as ours does)
    dali-cpu     classification/dali.py's build_dali_loaders (DATA.LOADER dali, DEVICE cpu): DALI's CPU decoder and
                 operators, DATA.NUM_WORKERS = DALI's CPU threads, random erasing on the batch
    dali-mixed   the same with DEVICE cuda: nvJPEG / GPU decoding and GPU augmentation (needs CUDA;
                 otherwise its row says skipped)
    dali-cpu-shards, dali-mixed-shards   the DALI loaders reading the shards (on request)

Each (loader, workers) runs in a fresh subprocess (one failing or crashing loader leaves the others
be; its row says why), whose own PyTorch work uses one thread. It builds the loader, skips a warm-up
(``--warmup`` batches; by default two rounds of the workers: 2 x workers, at least 3), then times
``--seconds`` (or ``--timed-images``), ending on a whole round of the workers. An epoch is repeated
copies of the generated images, long enough (at least 100 batches and 40 per worker,
``--epoch-images``) that the drain and refill at an epoch's end rarely falls in the timed window, as
on ImageNet (10,009 batches of 128 per epoch). The files come from the page cache: disk reads are not
measured.

CPU use: the CPU seconds (user + system) of the measuring process's whole tree, itself and its
DataLoader workers (DALI's threads are the process's own), over the timed window, from /proc (else
os.times, which misses live workers). So the table gives:

    img/s                  images per second of wall time
    CPU-s/s                CPU seconds used per second: how many cores were busy
    img/s per worker core  img/s / min(workers, cores), the usual but flattering figure: the main
                           process (receiving batches, pinning memory, DALI's Python side) is free in it
    img per CPU-s          img/s / (CPU-s/s): the fair figure, every busy core counted
    cores for R img/s      R / (img per CPU-s): cores needed to feed a GPU that trains at R img/s
                           (``--target-rate``), if throughput grows linearly with cores; compare the
                           rows at 1 worker and at all cores to see how far it does

    OMP_NUM_THREADS=1 python -m benchmarks.bench_loaders                      # workers 1 and all cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_loaders --quick              # smoke test (200 images, ~2 min)
    OMP_NUM_THREADS=1 python -m benchmarks.bench_loaders --workers 1 4 8 16 --seconds 30 --json loaders.json
    OMP_NUM_THREADS=1 python -m benchmarks.bench_loaders --loaders dali-cpu dali-cpu-shards --workers 8
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file, the project's modules would not be importable
    sys.exit('run it from the repository root as: python -m benchmarks.bench_loaders ...')

# The FAT-B0 training rate on one H100 that the loaders must keep up with: benchmarks/README.md, "End to
# end: FAT-B0 training step on the H100" (batch 128, 224 px, AMP bf16, MODEL.DWCONV_IMPL cuda: 1722.2 img/s).
TARGET_RATE = 1722
LOADERS = ['folder', 'shards', 'timm', 'dali-cpu', 'dali-mixed', 'dali-cpu-shards', 'dali-mixed-shards']
DEFAULT_LOADERS = LOADERS[:5]
WIDTH, HEIGHT = 500, 375  # ImageNet's most common size
GENERATOR_VERSION = 1  # bump when synth_image changes: the cache folder's name carries it
RESULT_PREFIX = 'RESULT '  # marks the worker's result line among whatever else it prints
DONE = 'done.json'  # written last into the images folder: the generated set is complete


# --- the data ------------------------------------------------------------------------------------

def _upsampled(rng, rows: int, cols: int, channels: int):
    """Uniform noise on a rows x cols grid, upsampled bicubically to the image size, centred on 0
    (HWC float32; one channel broadcasts over the three)."""
    import numpy as np
    from PIL import Image

    small = rng.integers(0, 256, (rows, cols, channels), dtype=np.uint8)
    image = Image.fromarray(small[..., 0] if channels == 1 else small)
    out = np.asarray(image.resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32) - 128
    return out[..., None] if channels == 1 else out


def synth_image(index: int, label: int):
    """A photo-like 500x375 RGB image: a smooth colour field around the class's hue, a few blurred
    shapes, luminance texture at four scales (about 1/f, as in natural images) of a per-image strength,
    and a little sensor noise; at JPEG quality 90 about 115 KB."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([GENERATOR_VERSION, index])
    hue = np.random.default_rng([GENERATOR_VERSION, 1_000_000 + label]).uniform(60, 196, 3)
    colour = hue + 0.7 * _upsampled(rng, 3, 4, 3) + 0.3 * _upsampled(rng, 9, 12, 3)
    image = Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(5, 12)):
        x0, y0 = int(rng.integers(-100, WIDTH)), int(rng.integers(-100, HEIGHT))
        box = (x0, y0, x0 + int(rng.integers(20, 250)), y0 + int(rng.integers(20, 200)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT)))
                          for _ in range(rng.integers(3, 7))], fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    detail = rng.uniform(0.9, 2.1)
    luma = detail * sum(weight * _upsampled(rng, HEIGHT // step, WIDTH // step, 1)
                        for step, weight in ((24, 0.25), (8, 0.25), (3, 0.3), (1, 0.2)))
    pixels = np.asarray(image, np.float32) + luma + rng.normal(0, 2.0, (HEIGHT, WIDTH, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_image(job) -> int:
    path, index, label, quality = job
    synth_image(index, label).save(path, 'JPEG', quality=quality)
    return os.path.getsize(path)


def _split_counts(images: int, classes: int) -> dict:
    return {'train': images, 'val': max(2 * classes, images // 20)}


def prepare_data(cache: Path, images: int, classes: int, quality: int, shard_mb: float, regenerate: bool,
                 processes: int) -> dict:
    """The generated ImageFolder (train/, val/) and its shards under ``cache``, made unless already
    there; returns where they are and what they hold."""
    base = cache / f'{images}img-{classes}cls-{WIDTH}x{HEIGHT}-q{quality}-v{GENERATOR_VERSION}'
    folder, shards = base / 'images', base / f'shards-{shard_mb:g}mb'
    counts = _split_counts(images, classes)
    info = {'folder': str(folder), 'shards': str(shards), 'train_images': counts['train'],
            'val_images': counts['val'], 'classes': classes, 'quality': quality, 'width': WIDTH,
            'height': HEIGHT, 'generated': False, 'converted': False}
    if regenerate or not (folder / DONE).exists():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
        jobs, index = [], 0
        for split, count in counts.items():
            for i in range(count):
                label = i % classes
                directory = folder / split / f'class_{label:02d}'
                directory.mkdir(parents=True, exist_ok=True)
                jobs.append((str(directory / f'{index:07d}.jpg'), index, label, quality))
                index += 1
        started = time.time()
        print(f'generating {len(jobs)} JPEGs in {folder} ({processes} processes) ...', flush=True)
        with multiprocessing.get_context('fork').Pool(processes) as pool:
            pool.map(_write_image, jobs, chunksize=16)
        (folder / DONE).write_text(json.dumps({'images': len(jobs), 'seconds': time.time() - started}))
        info['generated'] = True
        info['generate_s'] = time.time() - started
    sizes = [p.stat().st_size for p in (folder / 'train').rglob('*.jpg')]
    if len(sizes) != counts['train']:
        raise RuntimeError(f'{folder}/train holds {len(sizes)} JPEGs, expected {counts["train"]}: '
                           'run with --regenerate')
    info['mean_jpeg_kb'] = sum(sizes) / len(sizes) / 1000
    info['train_mb'] = sum(sizes) / 1e6

    from data.shards import INDEX, convert
    if not (shards / INDEX).exists():
        shutil.rmtree(shards, ignore_errors=True)
        started = time.time()
        print(f'converting to shards of {shard_mb:g} MB in {shards} ...', flush=True)
        convert(str(folder), str(shards), shard_mb, seed=0, splits=('train', 'val'), threads=processes,
                log=lambda *_: None)
        info['converted'] = True
        info['convert_s'] = time.time() - started
    index = json.loads((shards / INDEX).read_text())
    info['train_shards'] = len(index['splits']['train']['shards'])
    return info


# --- measuring -----------------------------------------------------------------------------------

def tree_cpu_seconds() -> tuple:
    """(CPU seconds, user + system, of this process and all its live descendants, each with its reaped
    children; how). From /proc where there is one; else os.times(), which counts this process and the
    children it has reaped, not live workers."""
    tick = os.sysconf('SC_CLK_TCK')
    stats = {}
    try:
        for name in os.listdir('/proc'):
            if not name.isdigit():
                continue
            try:
                with open(f'/proc/{name}/stat', 'rb') as f:
                    text = f.read()
            except OSError:  # ended meanwhile
                continue
            fields = text[text.rindex(b')') + 2:].split()  # after "pid (comm) ": state, ppid, ...
            # ppid; utime, stime, cutime, cstime (fields 14-17 of proc(5))
            stats[int(name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))
    except OSError:
        pass
    if os.getpid() not in stats:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system, 'os.times'
    children: dict = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo += children.get(pid, [])
    return total / tick, '/proc process tree'


class Repeated:
    """``dataset`` repeated to ``length`` items (a long epoch from few files); item i is item
    i mod len(dataset). Setting ``transform`` sets the wrapped data set's (timm's create_loader does)."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


def _config(spec: dict, root: str, dali: bool, device: str):
    from classification import get_config
    opts = ['DATA.DATA_PATH', root, 'DATA.NUM_WORKERS', str(spec['workers']), 'DEVICE', device,
            'DATA.LOADER', 'dali' if dali else 'torch']
    if spec['batch_size']:
        opts += ['DATA.BATCH_SIZE', str(spec['batch_size'])]
    return get_config(argparse.Namespace(cfg=spec['cfg'], opts=opts))


def epoch_length(train_images: int, batch: int, workers: int, requested: int) -> int:
    """Images per epoch: ``requested`` or at least 100 batches and 40 per worker, in whole copies of the
    training images."""
    wanted = requested or batch * max(100, 40 * max(workers, 1))
    return math.ceil(max(wanted, train_images) / train_images) * train_images


def build_loader(spec: dict):
    """(loader, whether it is an engine.TrainLoader (takes set_epoch), batch size, epoch images) for ``spec``."""
    import torch
    name, workers = spec['loader'], spec['workers']
    folder, shard_dir = spec['data']['folder'], spec['data']['shards']
    train_images = spec['data']['train_images']
    if name.startswith('dali'):
        from torchvision import datasets

        from classification.dali import FolderSplit, ShardSplit, build_dali_loaders  # may not exist (yet)
        from data.shards import ShardSet
        mixed = name.startswith('dali-mixed')
        if mixed and not torch.cuda.is_available():
            raise RuntimeError('no CUDA device: GPU decoding needs one')
        from_shards = name.endswith('-shards')
        config = _config(spec, shard_dir if from_shards else folder, True, 'cuda' if mixed else 'cpu')
        length = epoch_length(train_images, config.DATA.BATCH_SIZE, workers, spec['epoch_images'])
        copies = length // train_images
        if from_shards:
            shards = ShardSet(shard_dir)

            def split(name_, times=1):
                return ShardSplit(tars=[str(p) for p in shards.local_paths(name_)] * times,
                                  indexes=[str(p) for p in shards.index_paths(name_)] * times,
                                  samples=shards.split(name_)['samples'] * times, classes=shards.classes(name_))
        else:
            def split(name_, times=1):
                found = datasets.ImageFolder(os.path.join(folder, name_))
                return FolderSplit(samples=found.samples * times, classes=found.classes)
        train, _ = build_dali_loaders(config, split('train', copies), split('val'))
        return train, True, config.DATA.BATCH_SIZE, length

    config = _config(spec, shard_dir if name == 'shards' else folder, False, '')
    length = epoch_length(train_images, config.DATA.BATCH_SIZE, workers, spec['epoch_images'])
    if name == 'timm':
        from timm.data import create_dataset, create_loader
        dataset = create_dataset('', root=os.path.join(folder, 'train'), split='train', is_training=True)
        aug = config.AUG
        loader = create_loader(
            Repeated(dataset, length), input_size=(config.DATA.IN_CHANS, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE),
            batch_size=config.DATA.BATCH_SIZE, is_training=True, scale=tuple(aug.SCALE), hflip=aug.HFLIP,
            color_jitter=aug.COLOR_JITTER, auto_augment=None if aug.AUTO_AUGMENT == 'none' else aug.AUTO_AUGMENT,
            re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT, interpolation=config.DATA.INTERPOLATION,
            num_workers=workers, pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
            use_prefetcher=False, persistent_workers=True)
        return loader, False, config.DATA.BATCH_SIZE, length

    from classification.data import build_dataset
    from data import build_train_loader
    from data.shards import ShardSet
    shards = ShardSet(shard_dir) if name == 'shards' else None
    dataset = build_dataset('train', config.DATA.DATA_PATH, config, shards=shards)
    return build_train_loader(Repeated(dataset, length), config), True, config.DATA.BATCH_SIZE, length


def _batches(loader, set_epoch: bool):
    """Batches of epoch after epoch."""
    epoch = 0
    while True:
        if set_epoch:
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(spec: dict) -> dict:
    """Build ``spec``'s loader, skip the warm-up, time the steady state; img/s and CPU use."""
    import torch
    name, workers = spec['loader'], spec['workers']
    dali = name.startswith('dali')
    sync = torch.cuda.synchronize if name.startswith('dali-mixed') else (lambda: None)
    # The batches of DataLoader workers arrive in rounds of one per worker; DALI's threads share a batch.
    rounds = 1 if dali else max(workers, 1)
    warmup = spec['warmup'] or (3 if dali else max(3, 2 * rounds))
    started = time.perf_counter()
    loader, set_epoch, batch_size, length = build_loader(spec)
    batches = _batches(loader, set_epoch)
    images, labels = next(batches)
    first_batch_s = time.perf_counter() - started
    shape, dtype, device = list(images.shape), str(images.dtype).replace('torch.', ''), images.device.type
    for _ in range(warmup - 1):
        next(batches)
    sync()
    cpu0, cpu_method = tree_cpu_seconds()
    t0 = time.perf_counter()
    count = timed = 0
    while True:
        _, labels = next(batches)
        count += len(labels)
        timed += 1
        done = count >= spec['timed_images'] if spec['timed_images'] else time.perf_counter() - t0 >= spec['seconds']
        if done and timed % rounds == 0 and timed >= 2:
            break
    sync()
    elapsed = time.perf_counter() - t0
    cpu = tree_cpu_seconds()[0] - cpu0
    batches.close()
    cores = spec['cores']
    img_s = count / elapsed
    busy = cpu / elapsed
    return dict(loader=name, workers=workers, img_s=img_s, cpu_s_per_s=busy,
                img_s_per_worker_core=img_s / max(1, min(workers, cores)),
                img_per_cpu_s=img_s / busy if busy > 0 else float('nan'),
                cores_for_target=spec['target_rate'] * busy / img_s, target_rate=spec['target_rate'],
                images=count, batches=timed, seconds=elapsed, cpu_seconds=cpu, warmup_batches=warmup,
                first_batch_s=first_batch_s, batch_size=batch_size, epoch_images=length, batch_shape=shape,
                dtype=dtype, device=device, cpu_method=cpu_method)


def _error_line(error: BaseException) -> str:
    """The error in one line: for an error in a DataLoader worker, the original one (the last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if 'Original Traceback' in str(error):
        return lines[-1]
    return f'{type(error).__name__}: {lines[0]}'


def _worker(spec: dict) -> None:
    """Run in a fresh process: one measurement, printed as one result line (an error as its result)."""
    import torch
    torch.set_num_threads(1)  # the main process's own tensor work (DALI's batch-level random erasing)
    try:
        result = measure(spec)
    except BaseException as error:  # noqa: B902 (a SystemExit from a library is a result too)
        result = dict(loader=spec['loader'], workers=spec['workers'], error=_error_line(error))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no waiting on DataLoader workers' or DALI's teardown


def run_measurement(spec: dict, timeout: float) -> dict:
    """``spec`` measured in a fresh subprocess (its own session, so that a hung one is killed with its
    workers); a crash, a hang or no result line becomes the result's ``error``."""
    cmd = [sys.executable, '-m', 'benchmarks.bench_loaders', '--worker', json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return dict(loader=spec['loader'], workers=spec['workers'], error=f'no result within {timeout:.0f} s (killed)')
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), 'no output')
    return dict(loader=spec['loader'], workers=spec['workers'], error=f'worker exited with {proc.returncode}: {last}')


# --- reporting -----------------------------------------------------------------------------------

def versions() -> dict:
    import importlib.metadata

    import PIL
    import timm
    import torch
    import torchvision
    from PIL import features
    found = {'python': sys.version.split()[0], 'torch': torch.__version__, 'torchvision': torchvision.__version__,
             'timm': timm.__version__, 'pillow': PIL.__version__, 'libjpeg': features.version('jpg') or '?',
             'dali': 'not installed'}
    for dist in importlib.metadata.distributions():
        if (dist.metadata['Name'] or '').lower().startswith('nvidia-dali'):
            found['dali'] = f"{dist.version} ({dist.metadata['Name']})"
    return found


def format_result(r: dict) -> str:
    head = f"  {r['loader']:<18} {r['workers']:>3} workers/threads  "
    if 'error' in r:
        return head + 'not available: ' + r['error']
    if 'skipped' in r:
        return head + 'skipped: ' + r['skipped']
    return head + (f"{r['img_s']:8.1f} img/s  {r['cpu_s_per_s']:5.2f} CPU-s/s  {r['img_per_cpu_s']:6.1f} img/CPU-s  "
                   f"({r['images']} images in {r['seconds']:.1f} s after {r['warmup_batches']} warm-up batches; "
                   f"first batch {r['first_batch_s']:.1f} s)")


def table_lines(results: List[dict], target: float) -> List[str]:
    columns = ['loader', 'workers / threads', 'img/s', 'CPU-s/s', 'img/s per worker core', 'img per CPU-s',
               f'cores for {target:g} img/s']
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
    for r in results:
        if 'error' in r or 'skipped' in r:
            note = f"not available: {r['error']}" if 'error' in r else f"skipped: {r['skipped']}"
            cells = [note.replace('|', '/')] + [''] * (len(columns) - 3)
        else:
            cells = [f"{r['img_s']:.1f}", f"{r['cpu_s_per_s']:.2f}", f"{r['img_s_per_worker_core']:.1f}",
                     f"{r['img_per_cpu_s']:.1f}", f"{r['cores_for_target']:.1f}"]
        lines.append('| ' + ' | '.join([r['loader'], str(r['workers'])] + cells) + ' |')
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--loaders', nargs='+', choices=LOADERS, default=DEFAULT_LOADERS, metavar='LOADER',
                        help=f'of {", ".join(LOADERS)} (default: {" ".join(DEFAULT_LOADERS)})')
    parser.add_argument('--workers', type=int, nargs='+', default=None,
                        help=f'DataLoader workers / DALI threads to measure each loader with (default: 1 and the '
                             f'{cores} available cores)')
    parser.add_argument('--target-rate', type=float, default=TARGET_RATE,
                        help='img/s one GPU trains at, for the "cores for R img/s" column (default: FAT-B0\'s '
                             'training step on an H100, batch 128, AMP bf16, our depthwise kernels, 1722 img/s: '
                             'benchmarks/README.md, "End to end: FAT-B0 training step on the H100")')
    parser.add_argument('--images', type=int, default=None, help='training JPEGs to generate (default 2000)')
    parser.add_argument('--classes', type=int, default=10, help='class folders')
    parser.add_argument('--quality', type=int, default=90, help='JPEG quality')
    parser.add_argument('--shard-mb', type=float, default=32, help='shard size for data.shards.convert')
    parser.add_argument('--cache', type=Path, default=Path('/tmp/fat_bench_loaders'),
                        help='where the generated images and shards are kept and reused')
    parser.add_argument('--regenerate', action='store_true', help='make the images and shards afresh')
    parser.add_argument('--cfg', default=str(ROOT / 'configs' / 'fat_b0_224.yaml'),
                        help='the config whose training transforms and batch size are used')
    parser.add_argument('--batch-size', type=int, default=None, help="default: the config's DATA.BATCH_SIZE (128)")
    parser.add_argument('--seconds', type=float, default=None, help='timed seconds per measurement (default 20)')
    parser.add_argument('--timed-images', type=int, default=0, help='time this many images instead of --seconds')
    parser.add_argument('--warmup', type=int, default=0,
                        help='batches skipped before timing (default: 2 x workers, at least 3; DALI 3)')
    parser.add_argument('--epoch-images', type=int, default=0,
                        help='images per epoch, in repeated copies of the generated ones (default: at least 100 '
                             'batches and 40 per worker)')
    parser.add_argument('--timeout', type=float, default=None, help='seconds before a measurement is given up')
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: 200 images, batch 32, 4 s per measurement')
    parser.add_argument('--json', type=Path, help='also write the results here')
    parser.add_argument('--worker', metavar='SPEC_JSON', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return

    images = args.images or (200 if args.quick else 2000)
    batch_size = args.batch_size or (32 if args.quick else None)
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    timeout = args.timeout or (300.0 if args.quick else 600.0)
    workers = list(dict.fromkeys(args.workers or [1, cores]))

    import torch

    from benchmarks.bench_models import cpu_name

    data = prepare_data(args.cache, images, args.classes, args.quality, args.shard_mb, args.regenerate, cores)
    found = versions()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    meta = dict(date=time.strftime('%Y-%m-%d %H:%M'), cpu=cpu_name(), cores=os.cpu_count(), available_cores=cores,
                gpu=gpu, load_average_1min=load, versions=found, omp_num_threads=os.environ.get('OMP_NUM_THREADS'),
                cfg=os.path.relpath(args.cfg, ROOT), target_rate=args.target_rate, data=data, seconds=seconds,
                timed_images=args.timed_images, batch_size=batch_size, command=' '.join(sys.argv))
    v = found
    print(f"# {meta['date']}, {meta['cpu']}, {os.cpu_count()} cores ({cores} available), GPU: {gpu}; "
          f"load average {load:.2f} at start")
    print(f"# torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}, DALI {v['dali']}, "
          f"Pillow {v['pillow']} (libjpeg {v['libjpeg']}), Python {v['python']}, "
          f"OMP_NUM_THREADS={meta['omp_num_threads']}")
    print(f"# data: {data['train_images']} train JPEGs (+{data['val_images']} val), {WIDTH}x{HEIGHT}, quality "
          f"{args.quality}, {args.classes} classes, mean {data['mean_jpeg_kb']:.1f} KB ({data['train_mb']:.0f} MB); "
          f"{data['train_shards']} train shards of up to {args.shard_mb:g} MB; {data['folder']}")
    print(f"# transforms: {meta['cfg']} training; batch {batch_size or 'from the config'}; "
          + (f'{args.timed_images} images' if args.timed_images else f'{seconds:g} s') + ' timed per measurement')

    results = []
    for name in args.loaders:
        for w in workers:
            if name.startswith('dali-mixed') and not torch.cuda.is_available():
                result = dict(loader=name, workers=w, skipped='no CUDA device (GPU decoding)')
            else:
                spec = dict(loader=name, workers=w, data=data, cfg=args.cfg, batch_size=batch_size, seconds=seconds,
                            timed_images=args.timed_images, warmup=args.warmup, epoch_images=args.epoch_images,
                            cores=cores, target_rate=args.target_rate)
                result = run_measurement(spec, timeout)
            results.append(result)
            print(format_result(result), flush=True)
    print()
    print('\n'.join(table_lines(results, args.target_rate)))
    print()
    print('CPU-s/s: CPU seconds of the measuring process and its workers per second (busy cores); img per CPU-s = '
          'img/s / CPU-s/s; cores for R = R / img per CPU-s, if throughput scales linearly with cores. '
          f'Load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine lowers img/s).')
    if args.json:
        args.json.write_text(json.dumps({'meta': meta, 'results': results}, indent=1))


if __name__ == '__main__':
    main()
