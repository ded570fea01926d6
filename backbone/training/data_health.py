"""What bad data a run met: skipped samples, repaired images, dropped boxes -- one summary per run.

Datasets report two kinds of findings:

* at setup (cheap checks, no image decoded): a :class:`HealthReport` on ``dataset.health``
  (missing files, dropped boxes, ...); the datamodule refuses to start when the samples known bad
  exceed ``data.max_bad_fraction`` (:func:`check_setup_fraction`).
* at load time, per sample, in the DataLoader workers (separate processes): a list of
  :data:`Event` ``(kind, reason, item)`` carried with the sample through the collate function to the
  main process as ``batch["health"] = {"samples": B, "events": [...]}``.

:class:`DataHealth` (a Lightning callback, ``conf/callbacks/default.yaml: data_health``) adds the
batches' events up, stops the run with one ``error:`` line when the samples skipped at load exceed
``data.max_bad_fraction``, and at the end of fit / validate / test all-gathers the counts over the DDP
ranks, logs one summary and writes it to ``<output_dir>/data_health.json``.

What the limit counts: distinct bad files of the split, against the split's size (a file skipped in
every epoch, or met again as another sample's replacement, counts once; the summary gives files and skip
events apart). A skipped training sample is replaced by a seeded random other one
(:func:`replacement_order`), so a run of consecutive bad files (a broken copy) does not hand the
skip on to its neighbours.

Kinds: ``skipped`` (a sample not trained / scored on; reason e.g. ``truncated``, ``mask size``),
``repaired`` (an image used after a repair; reason the repair tag, e.g. ``grayscale``, ``16-bit``,
``size-mismatch``), ``boxes_dropped`` (annotations left out; reason e.g. ``non-finite``),
``missing`` (listed but not on disk, found at setup).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import numpy as np

from backbone.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: (kind, reason, item): item names the file and/or image id
Event = tuple[str, str, str]
SKIPPED, REPAIRED, BOXES_DROPPED, MISSING = "skipped", "repaired", "boxes_dropped", "missing"
#: kinds that make a sample bad (count toward data.max_bad_fraction)
BAD_KINDS = (SKIPPED, MISSING)
#: examples kept per (kind, reason)
EXAMPLES = 5
#: random replacements tried before a scan of the whole split
REPLACEMENT_DRAWS = 16


def replacement_order(index: int, n: int, seed: int = 0) -> Iterator[int]:
    """Sample indices to try for ``index`` of a split of ``n``: ``index`` itself, then (it was bad)
    :data:`REPLACEMENT_DRAWS` seeded random other ones, then every other index from a random start, so that
    a readable sample is found if there is one. Deterministic in (seed, index): a seeded run stays
    reproducible whatever the worker that loads it. The next index would not do: bad files sit together
    after a broken copy, and each would hand its skip on to the next."""
    yield index
    if n <= 1:
        return
    rng = np.random.default_rng([int(seed), int(index)])
    for j in rng.integers(0, n - 1, REPLACEMENT_DRAWS):
        yield int(j) + int(j >= index)  # any index but ``index``
    start = int(rng.integers(n))
    for step in range(n):
        j = (start + step) % n
        if j != index:
            yield j


def check_max_bad_fraction(value: Any) -> float:
    """``data.max_bad_fraction`` as a float in [0, 1], else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError("data.max_bad_fraction", f"must be a number in [0, 1], got {value!r}",
                          "e.g. data.max_bad_fraction=0.01 (1% of the samples may be skipped)")
    return float(value)


class HealthReport:
    """Counts and first examples per (split, kind, reason); mergeable (across ranks) and JSON-able.

    ``samples[split]``: samples delivered in batches; ``count(split, kinds)``: events of those kinds;
    ``files(split, kinds)``: the distinct items (files) of those kinds.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.examples: dict[tuple[str, str, str], list[str]] = {}
        self.samples: dict[str, int] = {}
        self.items: dict[tuple[str, str], set[str]] = {}  # bad kinds only: what the limit counts

    def add(self, split: str, kind: str, reason: str, item: str = "", count: int = 1) -> None:
        key = (split, kind, reason)
        self.counts[key] = self.counts.get(key, 0) + int(count)
        if item and kind in BAD_KINDS:
            self.items.setdefault((split, kind), set()).add(item)
        ex = self.examples.setdefault(key, [])
        if item and len(ex) < EXAMPLES and item not in ex:
            ex.append(item)

    def add_events(self, split: str, events: Iterable[Event]) -> None:
        for kind, reason, item in events:
            self.add(split, kind, reason, item)

    def merge(self, other: "HealthReport") -> "HealthReport":
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
            ex = self.examples.setdefault(key, [])
            ex.extend(i for i in other.examples.get(key, []) if i not in ex)
            del ex[EXAMPLES:]
        for split, n in other.samples.items():
            self.samples[split] = self.samples.get(split, 0) + n
        for key, items in other.items.items():
            self.items.setdefault(key, set()).update(items)
        return self

    def renamed(self, split: str) -> "HealthReport":
        """A copy with every entry under ``split`` (a dataset reports under its own split name)."""
        out = HealthReport()
        for (_, kind, reason), n in self.counts.items():
            out.add(split, kind, reason, count=n)
            for item in self.examples.get((_, kind, reason), []):
                out.add(split, kind, reason, item, count=0)
        for n in self.samples.values():
            out.samples[split] = out.samples.get(split, 0) + n
        for (_, kind), items in self.items.items():
            out.items.setdefault((split, kind), set()).update(items)
        return out

    def count(self, split: str | None = None, kinds: Iterable[str] = BAD_KINDS) -> int:
        kinds = set(kinds)
        return sum(n for (s, k, _), n in self.counts.items() if k in kinds and split in (None, s))

    def files(self, split: str | None = None, kinds: Iterable[str] = BAD_KINDS) -> int:
        """Distinct bad items (files, named with their image id) of those kinds."""
        kinds = set(kinds)
        return len(set().union(*(v for (s, k), v in self.items.items() if k in kinds and split in (None, s))))

    def first(self, split: str | None = None, kinds: Iterable[str] = BAD_KINDS, n: int = 3) -> list[str]:
        kinds, out = set(kinds), []
        for (s, k, r), ex in self.examples.items():
            if k in kinds and split in (None, s):
                out += [f"{i} [{r}]" for i in ex]
        return out[:n]

    def to_dict(self) -> dict[str, Any]:
        """{split: {samples, [files: {kind: distinct bad files}], kind: {reason: {count, examples}}}}."""
        out: dict[str, Any] = {s: {"samples": n} for s, n in sorted(self.samples.items())}
        for (split, kind, reason), n in sorted(self.counts.items()):
            out.setdefault(split, {"samples": 0}).setdefault(kind, {})[reason] = {
                "count": n, "examples": list(self.examples.get((split, kind, reason), []))}
        for (split, kind), items in sorted(self.items.items()):
            out.setdefault(split, {"samples": 0}).setdefault("files", {})[kind] = len(items)
        return out

    def format(self, title: str = "data health") -> str:
        """Multi-line summary; 'no problems' when empty."""
        lines = [f"{title}:"]
        for split, entry in self.to_dict().items():
            head = f"  {split}: {entry.get('samples', 0)} samples loaded"
            kinds = {k: v for k, v in entry.items() if k not in ("samples", "files")}
            if not kinds:
                lines.append(head + ", no problems")
                continue
            lines.append(head)
            files = entry.get("files", {})
            for kind, reasons in kinds.items():
                total = sum(r["count"] for r in reasons.values())
                count = f"{files[kind]} files ({total} events)" if kind in files else str(total)
                lines.append(f"    {kind.replace('_', ' ')}: {count}")
                for reason, r in reasons.items():
                    ex = ", ".join(r["examples"])
                    lines.append(f"      {reason}: {r['count']}" + (f" (e.g. {ex})" if ex else ""))
        if len(lines) == 1:
            lines.append("  nothing loaded")
        return "\n".join(lines)


def check_setup_fraction(report: HealthReport, split: str, listed: int, max_bad_fraction: float | None,
                         where: object) -> None:
    """Refuse to start when the samples known bad at setup exceed ``max_bad_fraction`` of the ``listed`` ones."""
    bad = report.count(split)
    if max_bad_fraction is None or listed <= 0 or bad <= max_bad_fraction * listed:
        return
    raise DataError(where, f"{bad} of {listed} samples of '{split}' are unusable ({bad / listed:.1%} > "
                    f"data.max_bad_fraction={max_bad_fraction:g}), e.g. {', '.join(report.first(split))}",
                    "fix or re-download the data, or raise data.max_bad_fraction")


def _gather(report: HealthReport, trainer: pl.Trainer) -> HealthReport:
    """The sum of every rank's report (all ranks must call it)."""
    import torch.distributed as dist

    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return report
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (report.counts, report.examples, report.samples, report.items))
    total = HealthReport()
    for counts, examples, samples, items in parts:
        r = HealthReport()
        r.counts, r.examples, r.samples, r.items = counts, examples, samples, items
        total.merge(r)
    return total


def _rank_share(trainer: pl.Trainer, split: str) -> int:
    """Samples of ``split`` ("train" / "val") this rank loads per epoch; 0 when the datamodule does not say."""
    dm = trainer.datamodule
    ds = getattr(dm, "train_dataset" if split == "train" else "val_dataset", None) if dm is not None else None
    try:
        n = len(ds)
    except TypeError:
        return 0
    return -(-n // max(int(getattr(trainer, "world_size", 1) or 1), 1))


class DataHealth(pl.Callback):
    """Aggregate the data-health records of every batch; summary at the end, limit while running.

    Args:
        output_dir: where ``data_health.json`` is written (None: not written).
        min_samples: where the datamodule does not give the split's size: samples loaded (per split,
            per rank) before the load-time limit is checked between epoch ends (a fraction of a few
            samples means nothing).

    The limit is the datamodule's ``max_bad_fraction`` (``data.max_bad_fraction``; None: no limit).
    """

    def __init__(self, output_dir: str | Path | None = None, min_samples: int = 200) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.min_samples = int(min_samples)
        self.report = HealthReport()  # this rank's load-time events (cumulative over fit + validate)

    # ------------------------------------------------------------------ collecting
    def _take(self, trainer: pl.Trainer, batch: Any, split: str) -> None:
        health = batch.get("health") if isinstance(batch, Mapping) else None
        if not health:
            return
        self.report.samples[split] = self.report.samples.get(split, 0) + int(health["samples"])
        self.report.add_events(split, health["events"])
        if _rank_share(trainer, split) or self.report.samples[split] + self.report.count(split, (SKIPPED,)) >= self.min_samples:
            self._check(trainer, split)

    def _check(self, trainer: pl.Trainer, split: str) -> None:
        limit = getattr(trainer.datamodule, "max_bad_fraction", None) if trainer.datamodule is not None else None
        if limit is None:
            return
        bad, events = self.report.files(split, (SKIPPED,)), self.report.count(split, (SKIPPED,))
        share = _rank_share(trainer, split)
        if share:  # distinct bad files against the (rank's share of the) split
            of, total = share, f"the {share} '{split}' samples" + (" of this rank" if trainer.world_size > 1 else "")
            what = f"were found unreadable or malformed ({events} skip events so far)"
        else:  # the split's size unknown: against what was loaded so far
            of = self.report.samples.get(split, 0) + events  # a skipped sample was replaced or blanked
            total, what = f"{of} '{split}' samples loaded so far", "were skipped as unreadable or malformed"
        if of == 0 or bad <= limit * of:
            return
        root = getattr(trainer.datamodule, "root", "data")
        raise DataError(root, f"{bad} of {total} {what} ({bad / of:.1%} > data.max_bad_fraction={limit:g}), e.g. "
                        f"{', '.join(self.report.first(split, (SKIPPED,)))}",
                        "fix or remove those files, or raise data.max_bad_fraction")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._take(trainer, batch, "train")

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._take(trainer, batch, "val")

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._take(trainer, batch, "val")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, "train")  # a whole epoch seen: meaningful whatever its size

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, "val")

    # ------------------------------------------------------------------ summary
    def setup_report(self, trainer: pl.Trainer) -> HealthReport:
        """The datasets' setup-time findings (the same on every rank)."""
        report = HealthReport()
        dm = trainer.datamodule
        for split, attr in (("train", "train_dataset"), ("val", "val_dataset")):
            ds = getattr(dm, attr, None) if dm is not None else None
            found = getattr(ds, "health", None)
            if isinstance(found, HealthReport):
                report.merge(found.renamed(split))
        return report

    def summary(self, trainer: pl.Trainer) -> HealthReport:
        """Setup findings + every rank's load-time events (collective: call on all ranks)."""
        return self.setup_report(trainer).merge(_gather(self.report, trainer))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        total = self.summary(trainer)
        if not trainer.is_global_zero:
            return
        level = logging.WARNING if any(total.counts.values()) else logging.INFO
        log.log(level, "%s", total.format(f"data health (after {stage})"))
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "data_health.json").write_text(json.dumps(total.to_dict(), indent=1) + "\n")

