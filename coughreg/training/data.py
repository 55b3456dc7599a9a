"""Training input: rows of the spectrogram shards as padded batches of clips of similar length."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from coughreg.artifacts.shards import SpectrogramShardReader
from coughreg.config.schema import ExperimentConfig
from coughreg.model.network import PAD_DB
from coughreg.runtime.resources import available_cpus
from coughreg.training.distributed import distributed_context


class SpectrogramDataset(Dataset):
    """Rows of the shards as (log-mel float32 (mels, frames), labels); opens the shards per process.

    With ``views`` (the recording-chain copies, ``coughreg.features.extract``) and ``view_probability`` p, each clip is, in
    each epoch and with probability p, one of its copies instead of the recording as it came. With ``pairs``
    instead, an item is the recording as recorded and one of its copies (the recording again when it has none),
    cropped to the same stretch of time (``augmentation.recording_chain_consistency``). Every choice and the crop
    are drawn from (seed, epoch, row), so a resumed epoch repeats them exactly.
    """

    def __init__(self, paths: list[Path], rows: np.ndarray, labels: np.ndarray, crop_frames: int | None, seed: int,
                 views: ChainViews | None = None, view_probability: float = 0.0, pairs: bool = False) -> None:
        self.paths = [str(p) for p in paths]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.crop_frames = crop_frames
        self.seed = seed
        self.epoch = 0
        self.views = views if view_probability > 0 or pairs else None
        self.view_probability = view_probability
        self.pairs = pairs and views is not None
        self._reader: SpectrogramShardReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self) -> SpectrogramShardReader:
        if self._reader is None or self._pid != os.getpid():  # a fork must not share the parent's handles
            self._reader = SpectrogramShardReader([Path(p) for p in self.paths])
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        chosen = None  # which copy the clip is (None: the recording as recorded)
        copies = np.zeros(0, dtype=np.int64) if self.views is None else self.views.rows_of(row)
        if copies.size and not self.pairs:
            choice = np.random.default_rng((self.seed, self.epoch, row, VIEW_STREAM))
            if choice.random() < self.view_probability:
                chosen = int(copies[int(choice.integers(copies.size))])
        spectrogram = self._version(row, chosen)
        partner = None
        if self.pairs and copies.size:
            copy = int(copies[int(np.random.default_rng((self.seed, self.epoch, row, PAIR_STREAM)).integers(copies.size))])
            partner = self._version(row, copy)
        # a copy covers the first 60 s and a codec may make it a few frames longer or shorter: the crop is drawn
        # within the frames both have, so the two are the same stretch of the recording
        lengths = [version.shape[1] for version in (spectrogram, partner) if version is not None]
        frames, start = min(lengths), None
        if self.crop_frames is not None and max(lengths) > self.crop_frames:
            rng = np.random.default_rng((self.seed, self.epoch, row))
            start = int(rng.integers(0, max(0, frames - self.crop_frames) + 1))
        clip = self._crop(spectrogram, start)
        if self.pairs:  # no copies: the recording is its own partner, and the pair agrees by construction
            clip = (clip, clip if partner is None else self._crop(partner, start))
        return clip, torch.tensor(self.labels[i]), i

    def _version(self, row: int, copy_row: int | None) -> np.ndarray:
        if copy_row is None:
            return self._open().spectrogram(row)  # (mels, frames) float16
        return self.views.spectrogram(copy_row)

    def _crop(self, spectrogram: np.ndarray, start: int | None) -> torch.Tensor:
        if start is not None:
            spectrogram = spectrogram[:, start : start + self.crop_frames]
        return torch.from_numpy(spectrogram.astype(np.float32))


VIEW_STREAM = 17  # the generator that picks a clip's copy is its own: turning copies on leaves the crops as they were
PAIR_STREAM = 19  # and the one that picks the second version of a pair


class ChainViews:
    """The recording-chain copies of a features folder: for a row of its shards, the rows of its copies.

    The row map is built once, here; the copies' shards are opened again in each process (a data loader worker
    must not share handles).
    """

    def __init__(self, paths: list[Path], ids: list[str]) -> None:
        self.paths = [str(p) for p in paths]
        self._reader: SpectrogramShardReader | None = SpectrogramShardReader([Path(p) for p in self.paths])
        self._pid = os.getpid()
        by_id: dict[str, list[int]] = {}
        for copy_row, identifier in enumerate(self._reader.index["id"]):
            by_id.setdefault(identifier, []).append(copy_row)
        self._rows = [np.asarray(by_id.get(identifier, []), dtype=np.int64) for identifier in ids]  # by the shards' rows

    def _open(self) -> SpectrogramShardReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = SpectrogramShardReader([Path(p) for p in self.paths])
            self._pid = os.getpid()
        return self._reader

    def rows_of(self, row: int) -> np.ndarray:
        """The rows of a shard row's copies (none for a recording a chain could not take)."""
        return self._rows[row]

    def spectrogram(self, copy_row: int) -> np.ndarray:
        return self._open().spectrogram(copy_row)

    def __getstate__(self) -> dict:  # to a data loader worker: paths and the row map, no open files
        return {**self.__dict__, "_reader": None, "_pid": -1}


def collate_spectrograms(batch):
    """Pad to the batch's longest clip with digital silence; lengths let the model ignore padding.

    Items that are pairs (``SpectrogramDataset(pairs=True)``) give a batch of the B recordings as recorded followed
    by their B copies, labels repeated, and the B indices.
    """
    spectrograms, labels, indices = zip(*batch)
    if isinstance(spectrograms[0], tuple):
        spectrograms = [pair[0] for pair in spectrograms] + [pair[1] for pair in spectrograms]
        labels = labels + labels
    frames = max(s.shape[1] for s in spectrograms)
    padded = torch.full((len(spectrograms), spectrograms[0].shape[0], frames), PAD_DB)  # (batch, mels, frames)
    for k, spectrogram in enumerate(spectrograms):
        padded[k, :, : spectrogram.shape[1]] = spectrogram
    lengths = torch.tensor([s.shape[1] for s in spectrograms])
    return padded, lengths, torch.stack(labels), torch.tensor(indices)


class LengthBucketBatchSampler(Sampler):
    """Batches of similar length, so little of each batch is padding; random order in training.

    Training: the rows are cut into pools, each pool sorted by length and cut into batches, and
    the batches shuffled (a new order every epoch, from the seed). When ``blocks`` (each row's
    Parquet row group) is given, a pool is ``pool_blocks`` randomly chosen row groups, so every
    row group is read once per epoch instead of once per row (a shuffle buffer, as streaming
    loaders do); otherwise a pool is ``pool_batches`` batches of randomly chosen rows.
    Inference: sorted by length, in order, and only clips of the same length share a batch: no
    padding ever reaches a prediction (a convolution's receptive field reaches past the masked
    pooling into the padding), so validation predictions are what the exported scorer gives for
    each clip alone.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, train: bool, drop_last: bool, seed: int,
                 pool_batches: int = 32, blocks: np.ndarray | None = None, pool_blocks: int = 16) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.train = train
        self.drop_last = drop_last
        self.seed = seed
        self.pool_batches = pool_batches
        self.blocks = None if blocks is None else np.asarray(blocks)
        self.pool_blocks = pool_blocks
        self.epoch = 0
        self.rank, self.world, _ = distributed_context()

    def _pools(self, rng: np.random.Generator) -> list[np.ndarray]:
        n = len(self.lengths)
        if self.blocks is None:
            order = rng.permutation(n)
            size = self.batch_size * self.pool_batches
            return [order[i : i + size] for i in range(0, n, size)]
        ids = np.unique(self.blocks)
        chosen = rng.permutation(ids)
        pools = []
        for i in range(0, len(chosen), self.pool_blocks):
            members = np.flatnonzero(np.isin(self.blocks, chosen[i : i + self.pool_blocks]))
            pools.append(rng.permutation(members))
        return pools

    def _batches(self) -> list[np.ndarray]:
        if not self.train:
            order = np.argsort(self.lengths, kind="stable")
            same_length = np.split(order, np.flatnonzero(np.diff(self.lengths[order])) + 1)
            return [group[i : i + self.batch_size] for group in same_length for i in range(0, len(group), self.batch_size)]
        rng = np.random.default_rng((self.seed, self.epoch))
        batches = []
        for pool in self._pools(rng):
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            pool_batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            rng.shuffle(pool_batches)
            batches.extend(b for b in pool_batches if len(b) == self.batch_size or not self.drop_last)
        if self.world > 1:  # DistributedDataParallel: every rank the same number of different batches
            usable = len(batches) // self.world * self.world
            batches = batches[self.rank : usable : self.world]
        return batches

    def __iter__(self):
        for batch in self._batches():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._batches())


def create_loader(
    dataset: SpectrogramDataset, lengths: np.ndarray, config: ExperimentConfig, train: bool, device: torch.device, seed: int,
    batch_size: int | None = None, blocks: np.ndarray | None = None,
) -> DataLoader:
    # Reading float16 from memory-mapped shards is cheap: leave two cores to the training process itself.
    workers = min(config.environment.number_of_workers, max(0, available_cpus() - 2))
    batch_size = batch_size or config.training.batch_size
    drop_last = train and config.training.drop_last_batch and len(dataset) > batch_size
    sampler = LengthBucketBatchSampler(lengths, batch_size, train, drop_last, seed, blocks=blocks)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_spectrograms,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


