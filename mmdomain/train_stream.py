"""Training batches in an order fixed by (seed, epoch) alone, so a run can stop anywhere and continue exactly.

An epoch's order is computed, never streamed: the shards' usable samples (``ShardCatalog``) are put in a seeded
shard order, then shuffled within windows of ``data.shuffle_buffer`` samples, then cut into batches. Batch ``b`` of
an epoch is therefore known without reading batches ``0..b-1``, and the position a checkpoint stores is just
``(epoch, batches consumed)``: resuming reads nothing it skips.

Batches, not samples, are spread over ranks and DataLoader workers (batch ``b`` goes to rank ``b % world``; a rank's
``j``-th batch to worker ``(j - start) % workers``), and the DataLoader hands them back in order, so the batches a run
trains on are the same with 0, 2 or 8 workers, and a run may resume with another worker count. Ranks take ``world``
consecutive batches as one global batch, so ``world`` ranks at ``batch_size`` train on exactly the samples one
process at ``world * batch_size`` trains on; every rank gets the same number of batches per epoch (a collective step
that one rank skipped would hang the others), the last global batch's missing slots being ``padding`` items that
carry no sample: the rank steps with a zero-weight batch, so nothing is lost or trained twice. Workers only decode:
a sample that fails is left out of its batch and reported with it; the main process counts it once
(``FailureBudget``), so limits and the budget hold for the whole run, not per worker.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .data import SAMPLE_FAILURES, DataError, FailureBudget, SampleFormat, ShardCatalog, decode_sample
from .errors import MmdomainError
from .processor import MultimodalProcessor, SampleError
from .run_dir import RunLock
from .stop_requests import ignore_signals

log = logging.getLogger(__name__)


def epoch_order(counts: list[int], *, seed: int, epoch: int, shuffle_buffer: int, limit: int | None) -> np.ndarray:
    """Global sample numbers (positions in the catalog's shard-by-shard listing) in this epoch's training order.

    With ``limit`` the same first ``limit`` samples are used every epoch, only their order changes."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    samples = np.arange(offsets[-1] if limit is None else min(limit, offsets[-1]), dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    shard_of = np.searchsorted(offsets[1:], samples, side="right")
    rank_of_shard = np.empty(len(counts), dtype=np.int64)
    rank_of_shard[rng.permutation(len(counts))] = np.arange(len(counts))
    order = samples[np.argsort(rank_of_shard[shard_of], kind="stable")]  # shards in seeded order, samples in file order
    if shuffle_buffer > 1:
        for start in range(0, len(order), shuffle_buffer):
            window = order[start : start + shuffle_buffer]
            order[start : start + shuffle_buffer] = window[rng.permutation(len(window))]
    return order


@dataclass
class Position:
    """Where the stream stands: ``batch`` batches of this rank consumed in ``epoch``."""

    epoch: int = 0
    batch: int = 0


def _as_is(batch: Any) -> Any:  # the dataset yields finished batches; the DataLoader must not collate them again
    return batch


def _init_worker(_: int) -> None:
    ignore_signals()
    RunLock.close_in_child()


class TrainBatches(IterableDataset):
    """Yields this rank's batches of one epoch from ``start`` on; each item is ``{"index", "batch", "failures"}``
    where ``batch`` is the collated batch (None when every sample failed) and ``failures`` lists ``(key, reason)``."""

    def __init__(self, catalog: ShardCatalog, processor: MultimodalProcessor, *, layout: SampleFormat, seed: int, shuffle_buffer: int,
                 limit: int | None, batch_size: int, pack_length: int | None = None, rank: int = 0, world: int = 1,
                 examples: Any = None) -> None:
        super().__init__()
        # How a record becomes a training example and examples a batch, when the objective needs other than one
        # supervised conversation per row (a preference pair, a prompt to sample from): see mmdomain.objectives.
        self.examples = examples
        self.catalog, self.processor, self.layout = catalog, processor, layout
        self.seed, self.shuffle_buffer, self.limit, self.batch_size = seed, shuffle_buffer, limit, batch_size
        self.rank, self.world = rank, world
        self.pack_length = pack_length
        self.collate = processor.collate if pack_length is None else functools.partial(processor.collate_packed, pack_length=pack_length)
        self.offsets = np.concatenate([[0], np.cumsum(catalog.counts)]).astype(np.int64)
        self.start = Position()

    @property
    def samples_per_epoch(self) -> int:
        return min(self.catalog.total, self.limit) if self.limit is not None else self.catalog.total

    def batches_per_epoch(self) -> int:
        """Batches this rank gets each epoch: the same on every rank (the last ones may be padding)."""
        return math.ceil(self.total_batches() / self.world)

    def total_batches(self) -> int:
        """Batches of all ranks together in an epoch."""
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order = epoch_order(self.catalog.counts, seed=self.seed, epoch=self.start.epoch, shuffle_buffer=self.shuffle_buffer,
                            limit=self.limit)
        total = self.total_batches()
        for local in range(self.start.batch + worker, self.batches_per_epoch(), workers):
            b = local * self.world + self.rank
            if b >= total:  # this rank's slot of the epoch's last global batch is empty
                yield {"index": local, "batch": None, "failures": [], "padding": True}
                continue
            try:
                yield self._batch(local, order[b * self.batch_size : (b + 1) * self.batch_size])
            except (OSError, MmdomainError, ImportError) as exc:
                # Raised in the main process as it is: a worker's own exception would arrive wrapped in torch's
                # "Caught ... in DataLoader worker" text with its traceback, not as the one line a user should see.
                yield {"index": local, "batch": None, "failures": [], "error": exc}

    def filler(self) -> dict[str, Any] | None:
        """A usable batch of this epoch (the first global batch whose samples decode), for a rank whose own batch holds
        no sample: it steps on it with zero weight. Failures met here are not reported (the owning rank reports them)."""
        order = epoch_order(self.catalog.counts, seed=self.seed, epoch=self.start.epoch, shuffle_buffer=self.shuffle_buffer,
                            limit=self.limit)
        for b in range(self.total_batches()):
            found = self._batch(-1, order[b * self.batch_size : (b + 1) * self.batch_size])["batch"]
            if found is not None:
                return found
        return None

    def _batch(self, local: int, numbers: np.ndarray) -> dict[str, Any]:
        samples, failures = [], []
        reader, media_token, domains = self.catalog.reader, self.processor.media_token, self.processor.domains
        for number in numbers.tolist():
            shard = int(np.searchsorted(self.offsets[1:], number, side="right"))
            within = number - int(self.offsets[shard])
            key = reader.key(shard, within)
            try:
                record = decode_sample(reader.read(shard, within), key, self.layout, domains, media_token)
                if self.examples is not None:
                    samples.append(self.examples.build(self.processor, record))
                    continue
                sample = self.processor(record.conversations, record.media, key=record.key)
                if self.pack_length is not None and len(sample.input_ids) > self.pack_length:
                    raise SampleError(f"{len(sample.input_ids)} tokens do not fit data.pack_length={self.pack_length}; raise it")
                samples.append(sample)
            except SAMPLE_FAILURES as exc:
                failures.append((key, str(exc)))
        collate = self.collate if self.examples is None else functools.partial(self.examples.collate, self.processor)
        return {"index": local, "batch": collate(samples) if samples else None, "failures": failures}


def usable_workers(requested: int) -> int:
    """``requested`` data workers, capped at the CPUs this process may use. More workers than cores only contend (torch
    warns), and the batches do not depend on the worker count, so capping changes nothing but speed."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    if requested > cpus:
        log.info("data.num_workers=%d, but this process may use %d CPUs: using %d workers", requested, cpus, cpus)
        return cpus
    return requested


class BatchStream:
    """The main process's side: epochs of batches from a position, failures counted in one global budget.

    ``next_batch()`` returns the next usable batch; ``position`` is what a checkpoint stores (batches consumed)."""

    def __init__(self, dataset: TrainBatches, *, num_workers: int, failures: FailureBudget, position: Position | None = None,
                 pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.failures = dataset, usable_workers(num_workers), failures
        self.position = position or Position()
        self.pin_memory = pin_memory  # page-locked batches copy to a GPU asynchronously (to_device's non_blocking)
        self.keep_empty = dataset.world > 1  # ranks step together: an empty batch is returned (None), not skipped
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._usable_in_epoch = 0
        self._last_usable: dict[str, Any] | None = None

    def zero_weight_batch(self) -> dict[str, Any]:
        """A batch for a rank whose own holds no sample to run forward and backward on with zero weight (the other
        ranks' gradient reduction waits for it): its last usable batch, else the epoch's first that decodes."""
        if self._last_usable is None:
            self._last_usable = self.dataset.filler()
            if self._last_usable is None:
                raise DataError(f"no batch of epoch {self.position.epoch} holds a usable sample")
        return self._last_usable

    def _open(self) -> None:
        if self.position.batch >= self.dataset.batches_per_epoch():
            self.position = Position(self.position.epoch + 1, 0)
        self.dataset.start = Position(self.position.epoch, self.position.batch)
        self._from_start = self.position.batch == 0
        self._usable_in_epoch = 0
        # A generator of its own: a DataLoader otherwise draws its base seed from the global RNG at every epoch,
        # which would make training's random stream depend on when a run was resumed.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            generator=torch.Generator(), persistent_workers=False, worker_init_fn=_init_worker,
                            pin_memory=self.pin_memory)
        self._iterator = iter(loader)

    def next_batch(self) -> tuple[int, dict[str, Any] | None]:
        """(epoch, batch): the next batch with at least one usable sample, crossing epochs as needed. Across several
        ranks every rank's next batch is returned, None when it holds no usable sample (padding, or all failed)."""
        while True:
            if self._iterator is None:
                self._open()
            item = next(self._iterator, None)
            if item is None:
                if self._from_start and self._usable_in_epoch == 0 and not self.keep_empty:
                    raise DataError(f"the training shards yielded no usable sample in epoch {self.position.epoch} "
                                    f"({self.failures.total} failed)")
                self._iterator = None
                self.position = Position(self.position.epoch + 1, 0)
                continue
            if item.get("error") is not None:
                raise item["error"]
            if item["index"] != self.position.batch:  # the DataLoader keeps order; anything else is a bug, not data
                raise RuntimeError(f"batch {item['index']} arrived where batch {self.position.batch} was expected")
            self.position = Position(self.position.epoch, self.position.batch + 1)
            for key, reason in item["failures"]:
                self.failures.record(key, reason)
            if item["batch"] is not None:
                self._usable_in_epoch += 1
                self._last_usable = item["batch"]
                return self.position.epoch, item["batch"]
            if self.keep_empty:
                return self.position.epoch, None

    def close(self) -> None:
        self._iterator = None  # lets the DataLoader shut its workers down
