"""A weighted mix of several sources (`dataset.sources`): each source tokenized and cached on its own, then samples
drawn by weight.

The mix is a fixed multiset of (source, sample) pairs decided once from the seed, the weights and the sources' sizes:
each draw picks source i with probability w_i / sum(w), and takes that source's next sample in a seeded permutation
(a new permutation each time the source runs through). It ends (`dataset.mix_stop`)
  * first_exhausted: with the draw that takes some source's last sample (no sample twice; the rest is undersampled),
  * all_exhausted: with the draw at which every source has given all its samples (small sources repeat).
The loader then treats the mix as one data set (packing, epoch permutations, the split into ranks and micro-batches,
resume), so everything it guarantees holds for a mix too; the order of the draws does not matter, only which
samples were drawn. A weight is not part of any cache key: changing it re-mixes in milliseconds, never re-tokenizes.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MIX_STOPS = ("first_exhausted", "all_exhausted")
MAX_DRAWS = 2_000_000_000  # a mix this long is a mistake in the weights (and ~16 GB of indices)


@dataclass(frozen=True)
class MixEntry:
    name: str
    source: Any
    weight: float
    type: str


def _default_name(source: Any) -> str | None:
    if isinstance(source, str) and source:
        return os.path.splitext(os.path.basename(source.rstrip("/")))[0] or None
    return None


def mix_entries(dataset_cfg: Any) -> list[MixEntry]:
    """The checked entries of `dataset.sources`: each bad weight, name or source is named by its key."""
    entries: list[MixEntry] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(dataset_cfg.sources):
        key = f"dataset.sources[{index}]"
        if isinstance(item, DictConfig) and OmegaConf.is_missing(item, "source"):
            source = None
        else:
            source = item.source
        if source is None or source == "" or (not isinstance(source, str) and len(source) == 0):
            raise ValueError(f"{key}.source is not set: each entry needs a source (a file, glob, directory, saved "
                             "dataset dir, hub id, or a list of them)")
        weight = float(item.weight)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{key}.weight={item.weight} must be a positive number")
        name = item.name if item.name else _default_name(source)
        if not name:
            raise ValueError(f"{key}.name is not set and cannot be derived from source={source}: give it a name")
        if name in seen:
            raise ValueError(f"{key}.name={name!r} is used twice (also dataset.sources[{seen[name]}]): names must be "
                             "unique (they key the per-source metrics)")
        seen[name] = index
        kind = str(item.type) if item.type is not None else str(dataset_cfg.type)
        entries.append(MixEntry(name=name, source=source, weight=weight, type=kind))
    if str(dataset_cfg.mix_stop) not in MIX_STOPS:
        raise ValueError(f"dataset.mix_stop={dataset_cfg.mix_stop} must be one of {MIX_STOPS}")
    return entries


def _nth_occurrence(choices: np.ndarray, value: int, n: int) -> int | None:
    """Index of the n-th (1-based) occurrence of `value` in `choices`, or None."""
    where = np.flatnonzero(choices == value)
    return int(where[n - 1]) if len(where) >= n else None


def mix_draws(sizes: Sequence[int], weights: Sequence[float], seed: int, stop: str) -> np.ndarray:
    """The source of each draw (int array), drawn by weight until the stopping rule ends the mix."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0 or (sizes <= 0).any():
        raise ValueError(f"every source of a mix needs at least one sample (sizes {sizes.tolist()})")
    probabilities = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    rng = np.random.default_rng([seed, 0x6D6978])  # "mix": a stream of its own, apart from the other seeded draws
    expected = sizes / probabilities  # draws until source i is exhausted, on average
    needed = expected.min() if stop == "first_exhausted" else expected.max()
    if needed > MAX_DRAWS:
        raise ValueError(f"dataset.mix_stop={stop} with weights {list(weights)} over sources of {sizes.tolist()} "
                         f"samples needs ~{needed:,.0f} draws (more than {MAX_DRAWS:,}): raise the small weights or "
                         "use first_exhausted")
    chunk = int(min(max(1024, 1.2 * needed), 1 << 26))
    drawn: list[np.ndarray] = []
    while True:
        drawn.append(rng.choice(len(sizes), size=chunk, p=probabilities))
        choices = np.concatenate(drawn) if len(drawn) > 1 else drawn[0]
        ends = [_nth_occurrence(choices, i, int(n)) for i, n in enumerate(sizes)]
        if stop == "first_exhausted":
            found = [end for end in ends if end is not None]
            if found:
                return choices[: min(found) + 1]
        elif all(end is not None for end in ends):
            return choices[: max(ends) + 1]


def mix_indices(sizes: Sequence[int], weights: Sequence[float], seed: int, stop: str) -> tuple[np.ndarray, np.ndarray]:
    """(source_of, index_in_source) of every sample of the mix: the k-th draw from source i takes sample
    perm_{i, k // n_i}[k % n_i], each pass over a source a new seeded permutation."""
    source_of = mix_draws(sizes, weights, seed, stop)
    index_in_source = np.empty(len(source_of), dtype=np.int64)
    for i, size in enumerate(sizes):
        where = np.flatnonzero(source_of == i)
        passes = -(-len(where) // size)
        order = np.concatenate([np.random.default_rng([seed, i, p]).permutation(size) for p in range(passes)])
        index_in_source[where] = order[: len(where)]
    return source_of.astype(np.int32), index_in_source


class MixedSamples:
    """The mix as one data set for the loader: `len`, `[list of ints]` -> columns, `lengths`, and per sample its
    source (`source_of`, `names`) and supervised tokens (`num_supervised`, the targets after the collator's shift)."""

    def __init__(self, parts: Sequence[Any], names: Sequence[str], source_of: np.ndarray, index_in_source: np.ndarray):
        self.parts, self.names = list(parts), list(names)
        self.column_names = [c for c in self.parts[0].column_names if all(c in p.column_names for p in self.parts)]
        self.source_of, self.index_in_source = np.asarray(source_of), np.asarray(index_in_source)
        part_lengths = [np.asarray(p.data.column("length").to_numpy(), dtype=np.int64) for p in self.parts]
        part_supervised = [np.asarray(p.data.column("num_supervised").to_numpy(), dtype=np.int64) for p in self.parts]
        self.lengths = np.empty(len(self.source_of), dtype=np.int64)
        self.num_supervised = np.empty(len(self.source_of), dtype=np.int64)
        for i in range(len(self.parts)):
            where = self.source_of == i
            self.lengths[where] = part_lengths[i][self.index_in_source[where]]
            self.num_supervised[where] = part_supervised[i][self.index_in_source[where]]

    def __len__(self) -> int:
        return len(self.source_of)

    def __getitem__(self, key: Any) -> dict:
        if isinstance(key, (int, np.integer)):
            return {k: v[0] for k, v in self[[int(key)]].items()}
        indices = np.asarray(list(range(len(self))[key]) if isinstance(key, slice) else key, dtype=np.int64)
        out: dict[str, list] = {name: [None] * len(indices) for name in self.column_names}
        for part_index, part in enumerate(self.parts):
            positions = np.flatnonzero(self.source_of[indices] == part_index)
            if not len(positions):
                continue
            columns = part[self.index_in_source[indices[positions]].tolist()]
            for name in self.column_names:
                for position, value in zip(positions, columns[name]):
                    out[name][position] = value
        return out

    def counts(self, sample_indices: np.ndarray) -> dict:
        """{"source_samples": {name: samples}, "source_supervised_tokens": {name: targets}} over some samples."""
        sources = self.source_of[sample_indices]
        samples = np.bincount(sources, minlength=len(self.names))
        supervised = np.bincount(sources, weights=self.num_supervised[sample_indices], minlength=len(self.names))
        return {"source_samples": {n: int(c) for n, c in zip(self.names, samples)},
                "source_supervised_tokens": {n: int(c) for n, c in zip(self.names, supervised)}}


def label_rows(rows: Any, entry: MixEntry):
    """`rows` with the columns `source` (the entry's name) and `type` (chat / text) added (in memory)."""
    return rows.add_column("source", [entry.name] * len(rows)).add_column("type", [entry.type] * len(rows))


def _source_cfg(dataset_cfg: Any, entry: MixEntry, source: Any, eval_fraction: float) -> DictConfig:
    """The dataset config one source is prepared (and cached) with: the shared keys, its own source and type."""
    base = dataset_cfg if isinstance(dataset_cfg, DictConfig) else OmegaConf.structured(dataset_cfg)
    cfg = OmegaConf.merge(base, {"sources": [], "source": source, "type": entry.type, "eval_source": None,
                                 "eval_fraction": eval_fraction})
    return cfg


def prepare_mixture(dataset_cfg: Any, tokenizer: Any, tokenizer_path: str, rank: int = 0, poll_seconds: float = 2.0):
    """Prepare every source of `dataset.sources` (each its own cache), then mix their train splits by weight.

    The eval split is `dataset.eval_source` when set (prepared as the mix's default type), else the per-source
    held-out splits (`dataset.eval_fraction` of each), chat sources first, each row labelled with its `source` and
    `type` (so the validator reports a loss per source and scores answers on chat rows only)."""
    import datasets

    from llama2_sft.data.tokenize import PreparedData, prepare_dataset

    entries = mix_entries(dataset_cfg)
    if rank == 0 and not OmegaConf.is_missing(dataset_cfg, "source") and dataset_cfg.source:
        log.info("dataset.sources is set: dataset.source=%s is not used", dataset_cfg.source)
    own_eval = bool(dataset_cfg.eval_source)
    prepared = []
    for index, entry in enumerate(entries):
        cfg = _source_cfg(dataset_cfg, entry, entry.source, 0.0 if own_eval else dataset_cfg.eval_fraction)
        try:
            prepared.append(prepare_dataset(cfg, tokenizer, tokenizer_path, rank=rank, poll_seconds=poll_seconds))
        except ValueError as error:
            raise ValueError(f"dataset.sources[{index}] ({entry.name}): {error}") from error
    sizes = [len(p.train) for p in prepared]
    source_of, index_in_source = mix_indices(sizes, [e.weight for e in entries], int(dataset_cfg.seed),
                                             str(dataset_cfg.mix_stop))
    train = MixedSamples([p.train for p in prepared], [e.name for e in entries], source_of, index_in_source)
    if own_eval:
        if rank == 0:
            log.info("dataset.eval_source is set: one eval loss over it (eval_loss per source needs each source's own "
                     "held-out split: dataset.eval_source=null, dataset.eval_fraction > 0)")
        eval_entry = MixEntry("eval", dataset_cfg.eval_source, 1.0, str(dataset_cfg.type))
        eval_set = prepare_dataset(_source_cfg(dataset_cfg, eval_entry, dataset_cfg.eval_source, 0.0), tokenizer,
                                   tokenizer_path, rank=rank, poll_seconds=poll_seconds).train
    else:
        # each row labelled with its source and type: eval_loss/NAME per source, accuracy on chat rows only
        order = sorted(range(len(entries)), key=lambda i: entries[i].type != "chat")
        evals = [label_rows(prepared[i].eval, entries[i]) for i in order
                 if prepared[i].eval is not None and len(prepared[i].eval)]
        eval_set = datasets.concatenate_datasets(evals) if len(evals) > 1 else (evals[0] if evals else None)
    drawn = np.bincount(source_of, minlength=len(entries))
    mix = {e.name: {"weight": e.weight, "type": e.type, "samples": sizes[i], "drawn": int(drawn[i]),
                    "share": float(drawn[i] / len(source_of)), "cache": prepared[i].path}
           for i, e in enumerate(entries)}
    summary = {"mix": mix, "mix_stop": str(dataset_cfg.mix_stop), "num_train": len(train),
               "num_eval": len(eval_set) if eval_set is not None else 0,
               "sources": {e.name: prepared[i].summary for i, e in enumerate(entries)}}
    if rank == 0:
        log.info("mix of %d sources (%s), %s samples: %s", len(entries), dataset_cfg.mix_stop, f"{len(train):,}",
                 ", ".join(f"{n} {m['drawn']:,} of {m['samples']:,} ({m['share']:.1%}, weight {m['weight']:g})"
                           for n, m in mix.items()))
    return PreparedData(train, eval_set, summary, os.path.abspath(os.path.expanduser(dataset_cfg.cache_dir)))
