"""WebDataset shards of an ImageFolder root: written by ``python -m data.shards``, read map-style.

    python -m data.shards --data-path /data/imagenet --output /data/imagenet-shards

Layout of the output folder (the index is written last: without it the conversion is unfinished)::

    index.json         classes, label digits, and per split its shards: name, samples, bytes, sha256
    train-000000.tar   WebDataset samples: KEY.jpg (the original encoded bytes; png etc. keep their suffix) and
    train-000000.idx   KEY.cls (the class index, zero-padded ASCII); beside each tar, DALI's index (wds2idx)

KEY is the sample's position in torchvision's ImageFolder order of the source split. The samples are
stored in a shuffled order (so that streaming readers, DALI's among them, see mixed classes), and the
reader maps position -> (shard, byte range) through the ``.idx`` files: sample i of the shards is
sample i of the folder. The engine's sampler and per-sample seeding therefore work unchanged
(exact epochs, exact resume), and a run on the shards trains on the very batches a run on the
folders would. Why map-style rather than streaming: a streaming reader would need its own answer to
"every sample once per epoch over all processes" and "continue mid-epoch"; indexed random access
keeps the one answer the engine already has. The cost is random reads within shards, which local
disks and page caches serve well; remote shards are cached whole on local disk (below).

A location is a local folder, an ``http(s)://`` URL of the folder, or ``pipe:COMMAND`` where COMMAND
prints a file to stdout and ``{}`` stands for its name, e.g.
``pipe:aws s3 cp s3://bucket/imagenet-shards/{} -``. Remote files are fetched into a local cache
(DATA.SHARD_CACHE, data/fetch.py) before training starts, each checked against the index.

The index is data from elsewhere: it is checked whole when read (``parse_index``), and every name in
it must be a plain file name. Version 2 indexes (written since 2026-12) also give each ``.idx`` file's
size and sha256, so that a remote ``.idx`` is checked like its tar; a version 1 index's ``.idx``
files are fetched afresh every run.
"""
from .convert import convert, index_hash
from .index import (DEFAULT_SHARD_MB, FORMAT, INDEX, STATE, VERSION, check_same_classes, index_name, is_shard_location,
                    parse_index, shard_name)
from .reader import UNREADABLE_IMAGE, FetchFailed, ShardDataset, ShardSet, SkippingReader, SplitLayout

__all__ = ['DEFAULT_SHARD_MB', 'FORMAT', 'INDEX', 'STATE', 'UNREADABLE_IMAGE', 'VERSION', 'FetchFailed', 'ShardDataset',
           'ShardSet', 'SkippingReader', 'SplitLayout', 'check_same_classes', 'convert', 'index_hash', 'index_name',
           'is_shard_location', 'parse_index', 'shard_name']
