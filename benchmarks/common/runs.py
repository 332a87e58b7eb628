"""A run cache: one JSON line per finished run, keyed by its full setting,
so an interrupted benchmark resumes where it stopped."""

import json
import os


class RunCache:
    """The runs of `path` (a JSON-lines file), appended to as runs finish.

    Args:
        path: the cache file; created on the first `put`.
        report_only: `get` returns `None` for a run not in the cache
            instead of computing it (tables from the runs done so far).
    """

    def __init__(self, path, report_only=False):
        self.path, self.runs, self.report_only = path, {}, report_only
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    item = json.loads(line)
                    self.runs[item["key"]] = item["result"]

    def __contains__(self, key):
        return key in self.runs

    def put(self, key, result):
        self.runs[key] = result
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")

    def get(self, key, compute):
        """The cached result of `key`, else `compute()`'s (cached)."""
        if key not in self.runs and not self.report_only:
            self.put(key, compute())
        return self.runs.get(key)
