"""The search engine: batched path evaluators (exact message patching, attribution patching),
backward search strategies, and the runner that records every evaluated path in the store."""

from search.api import find_paths
from search.runner import RunResult, SearchRequest, resume_search, run_loaded, run_many, run_search
from search.strategies import SearchParams

__all__ = [
    "RunResult",
    "SearchParams",
    "SearchRequest",
    "find_paths",
    "resume_search",
    "run_loaded",
    "run_many",
    "run_search",
]
