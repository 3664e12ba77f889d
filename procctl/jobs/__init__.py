"""Built-in jobs."""

from .sum_threshold import SumCancelled, SumJob, SumJobError, SumResult, SumTimeout, sum_threshold

__all__ = ["SumCancelled", "SumJob", "SumJobError", "SumResult", "SumTimeout", "sum_threshold"]
