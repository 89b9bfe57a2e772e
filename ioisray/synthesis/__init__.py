"""Synthetic images for IOIS: the epoch plan (plan.py), the generator one actor runs (generator.py),
and the Ray actor pool plus the Ray Data source that streams its chunks into training (pool.py)."""
from ioisray.synthesis.plan import Chunk, assign_chunks, num_chunks, plan_epoch

__all__ = ["Chunk", "assign_chunks", "num_chunks", "plan_epoch"]
