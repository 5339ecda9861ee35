"""How the label job sizes its Ray Data tasks: rows per block, CPUs per task, hash-join partitions.

Apart from pipeline.py so that the tasks that need only these (the catalogue's id check) do not import torch.
"""

from __future__ import annotations

import math

# Rows per block: each <WHICH>_BLOCK_ROWS below (and sink.WRITE_BLOCK_ROWS) names the block it sizes.
# Rows per block of the rows to score, per CPU actor call and per GPU-path fetch/decode task: enough to amortise
# Ray Data's per-call cost, few enough that blocks stay small in the object store and the run's last block is
# short (docs/performance.md).
SCORE_BLOCK_ROWS = 64
# Rows per input-key task's block: a stat per poster is cheap, a task is not.
KEY_BLOCK_ROWS = 4096
# Catalogue rows per hash-join partition when embedding tables and known label rows are joined (a few MB of
# vectors each).
JOIN_BLOCK_ROWS = 20_000
# Reading the catalogue (and fetching posters on the GPU path) waits on I/O: each such task reserves a quarter
# of a CPU, so a few overlap their waits beside the scoring actors (each is a worker process: more cost memory).
IO_TASK_CPUS = 0.25
# Input keys (their stats or HEADs are threaded inside each task) and choosing each row's origin are CPU work:
# a CPU per task, so a night starts no more worker processes than the node has cores (docs/performance.md).
ROW_TASK_CPUS = 1.0


def join_partitions(rows: int | None) -> int:
    """Hash-join partitions: about JOIN_BLOCK_ROWS catalogue rows each."""
    return max(1, math.ceil((rows or 0) / JOIN_BLOCK_ROWS))
