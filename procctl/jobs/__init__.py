"""Built-in jobs."""

from .sum_threshold import SumCancelled, SumJob, SumJobError, SumResult, sum_threshold

__all__ = ["SumCancelled", "SumJob", "SumJobError", "SumResult", "sum_threshold"]
