"""Parquet spectrogram shards: one row per recording, the log-mel as raw little-endian float16 bytes.

A binary column (uncompressed, so a read is a memory copy) reads back about ten times faster than
a list column. Each shard carries the feature parameters, their hash, the schema version and the
source manifest's hash in its file metadata, and lands under a temporary name first.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coughreg.io.storage import atomic_path
from coughreg.runtime.errors import CoughPipelineError

SHARD_SCHEMA_VERSION = 1
METADATA_KEY = b"coughreg.shard"
SPECTROGRAM_DTYPE = np.dtype("<f2")


def shard_schema(label_columns: list[str], group_column: str | None) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()),
        pa.field("split", pa.string()),
        *[pa.field(label, pa.float64()) for label in label_columns],
        pa.field("group", pa.string()),
        pa.field("duration_s", pa.float32()),
        pa.field("n_mels", pa.int32()),
        pa.field("n_frames", pa.int32()),
        pa.field("spectrogram", pa.binary()),
    ]
    return pa.schema(fields)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int
    metadata: dict


class SpectrogramShardWriter:
    """Collect rows and write one shard atomically.

    Args:
        path: the final shard path; the file appears there only when complete.
        label_columns: label column names (float64 columns).
        group_column: the config's group column, stored as ``group``.
        metadata: file-level metadata (feature parameters, hashes); the schema version is added.
        row_group_rows: recordings per row group, the unit of a streaming read.
    """

    def __init__(
        self, path: Path, label_columns: list[str], group_column: str | None, metadata: dict, row_group_rows: int = 32
    ) -> None:
        self.path = Path(path)
        self.label_columns = list(label_columns)
        self.metadata = {**metadata, "schema_version": SHARD_SCHEMA_VERSION, "label_columns": self.label_columns,
                         "group_column": group_column}
        self.schema = shard_schema(self.label_columns, group_column).with_metadata(
            {METADATA_KEY: json.dumps(self.metadata, sort_keys=True).encode()}
        )
        self.row_group_rows = row_group_rows
        self._columns: dict[str, list] = {name: [] for name in self.schema.names}

    def add(self, record: dict, log_mel: np.ndarray) -> None:
        """Add one recording; ``log_mel`` is (mels, frames)."""
        spectrogram = np.ascontiguousarray(log_mel, dtype=SPECTROGRAM_DTYPE)
        if spectrogram.ndim != 2:
            raise ValueError(f"{record.get('id')}: spectrogram must be (mels, frames), got {spectrogram.shape}")
        self._columns["id"].append(str(record["id"]))
        self._columns["split"].append(str(record.get("split", "train")))
        for label in self.label_columns:
            self._columns[label].append(float(record.get(label, np.nan)))
        self._columns["group"].append(str(record.get("group", "")))
        self._columns["duration_s"].append(float(record.get("duration_s", np.nan)))
        self._columns["n_mels"].append(spectrogram.shape[0])
        self._columns["n_frames"].append(spectrogram.shape[1])
        self._columns["spectrogram"].append(spectrogram.tobytes())

    def __len__(self) -> int:
        return len(self._columns["id"])

    def close(self, extra_metadata: dict | None = None) -> ShardInfo:
        """Write the shard atomically; ``extra_metadata`` (known only at the end) joins the file-level metadata."""
        if extra_metadata:
            self.metadata = {**self.metadata, **extra_metadata}
            self.schema = self.schema.with_metadata({METADATA_KEY: json.dumps(self.metadata, sort_keys=True).encode()})
        table = pa.Table.from_pydict(self._columns, schema=self.schema)
        compression = {name: ("NONE" if name == "spectrogram" else "ZSTD") for name in self.schema.names}
        with atomic_path(self.path) as tmp:
            pq.write_table(
                table, tmp, row_group_size=self.row_group_rows, compression=compression,
                use_dictionary=["split", "group"], write_statistics=["id", "n_frames"],
            )
        return ShardInfo(self.path, len(table), self.metadata)


def read_shard_metadata(path: Path) -> dict:
    """A shard's file-level metadata; raises when the file is not a complete shard."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CoughPipelineError(f"{path}: not a complete Parquet shard: {exc}") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise CoughPipelineError(f"{path}: a Parquet file without spectrogram shard metadata")
    return json.loads(raw)


def decode_spectrogram(blob: bytes | memoryview, n_mels: int, n_frames: int) -> np.ndarray:
    """(mels, frames) float16 view of a shard's bytes (no copy)."""
    return np.frombuffer(blob, dtype=SPECTROGRAM_DTYPE).reshape(n_mels, n_frames)


class SpectrogramShardReader:
    """Random access by row and streaming over shards, memory-mapped, without loading the data set.

    Only the small columns (ids, labels, shapes) are held in memory; a spectrogram is read from
    its row group through the memory map when asked for, and the last row group is kept.
    """

    def __init__(self, paths: list[Path], cached_row_groups: int = 48) -> None:
        if not paths:
            raise CoughPipelineError("no spectrogram shards to read")
        self.paths = [Path(p) for p in paths]
        self._files = [pq.ParquetFile(p, memory_map=True) for p in self.paths]
        self.metadata = read_shard_metadata(self.paths[0])
        index_columns = ["id", "split", *self.metadata["label_columns"], "group", "duration_s", "n_mels", "n_frames"]
        tables = [f.read(columns=index_columns) for f in self._files]
        self.index = pa.concat_tables(tables).to_pandas()
        locations = []
        for shard, handle in enumerate(self._files):
            meta = handle.metadata
            for group in range(meta.num_row_groups):
                locations.extend((shard, group, row) for row in range(meta.row_group(group).num_rows))
        self._locations = np.array(locations, dtype=np.int64).reshape(-1, 3)
        self._cache: OrderedDict[tuple[int, int], pa.ChunkedArray] = OrderedDict()
        self._cache_size = max(1, cached_row_groups)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def blocks(self) -> np.ndarray:
        """The row group (numbered across shards) of every row: what a locality-aware sampler groups by."""
        _, first = np.unique(self._locations[:, :2], axis=0, return_inverse=True)
        return first.reshape(-1)

    def _row_group(self, shard: int, group: int) -> pa.Array:
        key = (shard, group)
        column = self._cache.get(key)
        if column is None:
            column = self._files[shard].read_row_group(group, columns=["spectrogram"]).column(0)
            self._cache[key] = column
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)  # least recently used
        else:
            self._cache.move_to_end(key)
        return column

    def spectrogram(self, row: int) -> np.ndarray:
        """(mels, frames) float16 of one row."""
        shard, group, offset = self._locations[row]
        column = self._row_group(int(shard), int(group))
        blob = column[int(offset)].as_buffer()
        return decode_spectrogram(blob, int(self.index.at[row, "n_mels"]), int(self.index.at[row, "n_frames"]))

    def __getitem__(self, row: int) -> tuple[np.ndarray, dict]:
        return self.spectrogram(row), self.index.iloc[row].to_dict()

    def stream(self) -> Iterator[tuple[np.ndarray, dict]]:
        """Every row in shard order, one row group in memory at a time."""
        row = 0
        for handle in self._files:
            for group in range(handle.metadata.num_row_groups):
                batch = handle.read_row_group(group, columns=["spectrogram", "n_mels", "n_frames"])
                blobs, mels, frames = (batch.column(i) for i in range(3))
                for offset in range(batch.num_rows):
                    spectrogram = decode_spectrogram(blobs[offset].as_buffer(), mels[offset].as_py(), frames[offset].as_py())
                    yield spectrogram, self.index.iloc[row].to_dict()
                    row += 1
