"""IOIS: Iterative Online Image Synthesis (Li et al., MICCAI 2024), Algorithm 1, one epoch at a time.

On every training worker, around each epoch of ordinary training (recipes/train.py):

    start_epoch  1. Accuracy Adaptive Sampling: quotas n_c = N * softmax((1 - a_c) / T), a_c the
                    per-class accuracy on the real training images in epoch e-1 (uniform at e = 0)
                 2. the classifier as it ended epoch e-1 guides the synthesis pool, which starts
                    making the quotas at once (unguided at e = 0: there is no trained classifier yet)
    wrap         3. the epoch trains on every real image plus the synthetic ones as they are made;
                    each synthetic image is used once, and only in the epoch it was made for
    end_epoch    4. the epoch's per-class accuracy on real images (all workers) updates AAS

`synthesis.filter` drops, in the actors, each image its judge (the classifier as it ended the last
epoch, none at e = 0, or `synthesis.filter_model`) gives less than that probability of its class; the
epoch records the drops per class. AAS counts real images only, so it never sees them either way.

Ablations by config: `aas.enabled: false` (uniform quotas), `synthesis.guidance: false` (unguided), and
`synthesis.mode: offline` (one set of `synthesis.budget` images, uniform quotas, unguided, made once
and reused every epoch). `synthesis.budget: balance` replaces the quotas, online and offline, by those
that fill every class up to the largest (resolve_budget), the same every epoch. The pool
(synthesis/pool.py) and the stream that carries its images into training (synthesis/stream.py) are
Ray's part; this module is the algorithm.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from ioisray.aas import AASState, balance_quotas, quotas as uniform_quotas
from ioisray.config import Config, ConfigError
from ioisray.config.schema import MAX_BUDGET
from ioisray.distributed import all_reduce_min, all_reduce_sum, barrier
from ioisray.engine import EpochStats
from ioisray.models.classifier import cpu_state_dict
from ioisray.synthesis.plan import plan_epoch
from ioisray.synthesis.tally import SyntheticTally

EXAMPLES_PER_CLASS = 8  # synthetic images per class rank 0 keeps each epoch, for the image grids


def is_on(cfg: Config) -> bool:
    return cfg.synthesis.mode != "none"


def live_filter(cfg: Config) -> bool:
    """Whether the classifier being trained judges the synthetic images (synthesis.filter without a
    filter_model): the actors then need its weights every epoch, guided or not."""
    sy = cfg.synthesis
    return sy.mode == "online" and sy.filter > 0 and not sy.filter_model


def resolve_budget(cfg: Config, class_counts) -> tuple[Config, Optional[np.ndarray]]:
    """`cfg` with an integer synthesis.budget, and the fixed quotas of every epoch (None: AAS's or uniform
    ones). `synthesis.budget: balance` becomes the quotas that fill each class of the training split
    (`class_counts`) up to the largest, capped by synthesis.max_budget, and their sum: the budget, which
    fixes the epoch's chunks, stays the same for the whole run. Any other config is returned as it is."""
    s = cfg.synthesis
    if s.budget != "balance" or s.mode == "none":
        return cfg, None
    quotas = balance_quotas(class_counts, s.max_budget or MAX_BUDGET)
    if quotas.sum() == 0:
        raise ConfigError(f"synthesis.budget=balance: every class of the training split has {int(max(class_counts))} "
                          f"images already, so there is nothing to balance; give synthesis.budget a number")
    resolved = s.model_copy(update={"budget": int(quotas.sum()), "max_budget": None})
    return cfg.model_copy(update={"synthesis": resolved}), quotas


class IOIS:
    """The IOIS state of one training worker: AAS (the same on every worker: it is fed all-reduced
    counts), this epoch's quotas and what the worker received. Rank 0 talks to the pool.
    `fixed_quotas` (synthesis.budget=balance, see resolve_budget) are every epoch's quotas, online or
    offline; AAS still records the accuracy then, but does not split the budget."""

    def __init__(self, cfg: Config, num_classes: int, pool, rank: int, fixed_quotas=None):
        self.cfg, self.pool, self.rank = cfg, pool, rank
        self.fixed_quotas = None if fixed_quotas is None else np.asarray(fixed_quotas, dtype=np.int64)
        if self.fixed_quotas is not None and (self.fixed_quotas.shape != (num_classes,)
                                              or self.fixed_quotas.sum() != cfg.synthesis.budget):
            raise ValueError(f"fixed quotas {self.fixed_quotas.tolist()} must be one per class ({num_classes}) and "
                             f"sum to synthesis.budget={cfg.synthesis.budget}")
        self.aas = AASState(num_classes)
        self.quotas: Optional[np.ndarray] = None
        self.tally: Optional[SyntheticTally] = None

    @property
    def online(self) -> bool:
        return self.cfg.synthesis.mode == "online"

    # -- Algorithm 1, one epoch -----------------------------------------------------------------

    def start_epoch(self, epoch: int, classifier: torch.nn.Module) -> None:
        """Steps 1-2. Every worker returns only once the pool has this epoch's plan, so none can read
        the epoch's stream before it exists."""
        s = self.cfg.synthesis
        self.quotas = self._quotas()
        # Offline synthesis replays epoch 0's plan: the same images, made once.
        made_for = epoch if self.online else 0
        if self.rank == 0:
            # The classifier as it ended the last epoch, to guide and/or to judge (synthesis.filter).
            live = self.online and epoch > 0 and (s.guidance or live_filter(self.cfg))
            self.pool.start_epoch(made_for, plan_epoch(self.quotas, made_for, self.cfg.seed, s.chunk_size, s.pool_size),
                                  cpu_state_dict(classifier) if live else None, reuse=not self.online)
        barrier()
        self.tally = SyntheticTally(self.aas.num_classes, made_for, EXAMPLES_PER_CLASS if self.rank == 0 else 0,
                                    started_at=time.time())

    def _quotas(self) -> np.ndarray:
        s, a = self.cfg.synthesis, self.cfg.aas
        if self.fixed_quotas is not None:
            self.aas.last_quotas = [int(v) for v in self.fixed_quotas]
            return self.fixed_quotas.copy()
        if self.online and a.enabled:
            return self.aas.quotas(s.budget, a.temperature, floor=a.floor)
        q = uniform_quotas(None, s.budget, num_classes=self.aas.num_classes, floor=a.floor)
        self.aas.last_quotas = [int(v) for v in q]
        return q

    def wrap(self, batches: Iterable[dict]) -> Iterator[dict]:
        """Step 3: this epoch's batches, with the synthetic rows counted (and checked to be this epoch's)."""
        return self.tally.watch(batches)

    def end_epoch(self, stats: EpochStats) -> dict:
        """Step 4, and what the epoch's synthesis did: quotas, images received per class (all workers),
        seconds to the first synthetic batch (and to the first batch of any kind) at any worker, and,
        from rank 0, the pool's images/s per actor and seconds to its first and last chunk."""
        self.aas.update(stats.correct, stats.total)  # counts already summed over the workers
        received = all_reduce_sum(torch.as_tensor(self.tally.per_class, dtype=torch.float64)).long().tolist()
        firsts = all_reduce_min(torch.tensor([math.inf if t is None else t for t in
                                              (self.tally.seconds_to_first, self.tally.seconds_to_first_batch)],
                                             dtype=torch.float64))
        first, first_batch = (float(t) if math.isfinite(float(t)) else None for t in firsts)
        out = {"quotas": [int(q) for q in self.quotas], "synthetic_per_class": received,
               "seconds_to_first_synthetic": first, "seconds_to_first_batch": first_batch}
        if self.rank == 0:
            pool = self.pool.wait_until_made(timeout=60)
            out.update(generation_seconds=pool["generation_seconds"], seconds_to_first_chunk=pool["seconds_to_first_chunk"],
                       images_per_second_per_actor=pool["images_per_second"], actors_started=pool["actors_started"],
                       synthesis_node_ids=pool["node_ids"], actor_gpu_memory_mb=pool["gpu_memory_mb"])
            if self.cfg.synthesis.filter:  # made, judged and dropped before they reached training
                out["filtered_per_class"] = pool.get("filtered_per_class") or [0] * self.aas.num_classes
        return out

    # -- checkpoint and reporting ---------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"aas": self.aas.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.aas = AASState.from_dict(state["aas"])

    def examples(self) -> list[torch.Tensor]:
        """This epoch's kept synthetic images per class (rank 0), uint8 (k, H, W, 3) each."""
        return self.tally.examples()

    @staticmethod
    def summary(m: dict) -> str:
        """The console line of an epoch's synthesis metrics."""
        def secs(v):
            return "nan" if v is None else f"{v:.1f}"

        filtered = f" (filtered out {sum(m['filtered_per_class'])})" if "filtered_per_class" in m else ""
        return (f"synthesis: quotas {m['quotas']}, received {sum(m['synthetic_per_class'])}{filtered}, first after "
                f"{secs(m['seconds_to_first_synthetic'])}s (first batch {secs(m['seconds_to_first_batch'])}s, first "
                f"chunk made {secs(m.get('seconds_to_first_chunk'))}s), all generated after "
                f"{secs(m.get('generation_seconds'))}s, images/s per actor "
                f"{[round(r, 1) for r in m.get('images_per_second_per_actor', [])]}")
