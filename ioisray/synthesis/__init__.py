"""Synthetic images for IOIS: the epoch plan (plan.py), the generator one actor runs (generator.py), the
Ray actor pool (pool.py), the Ray Data stream of its chunks into training (stream.py), and what a
training worker received (tally.py)."""
from ioisray.synthesis.plan import Chunk, chunk_sizes, num_chunks, plan_epoch

__all__ = ["Chunk", "chunk_sizes", "num_chunks", "plan_epoch"]
