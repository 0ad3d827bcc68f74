import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_scored import write_cohort_manifest  # noqa: E402

# A rank that joins the group and never reaches the barrier: the slowest rank of a long cohort.
RANK_THAT_NEVER_FINISHES = """
import time
from datetime import timedelta
import torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(days=1))
time.sleep(600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_ends_a_rank_that_waits_at_the_barrier_for_a_slower_one(tmp_path):
    """A rank that finished its shard waits, possibly for hours, for the slowest one. SIGTERM
    (SLURM, docker stop) must end it: Python runs signal handlers only between its own
    instructions, never inside gloo's barrier, and leaving the group would wait for the others."""
    manifest = write_cohort_manifest(tmp_path / "cohort", patients=1)
    out = tmp_path / "out"
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "WORLD_SIZE": "2"}
    slowest = subprocess.Popen([sys.executable, "-c", RANK_THAT_NEVER_FINISHES],
                               env=env | {"RANK": "1", "LOCAL_RANK": "1"})
    rank_0 = subprocess.Popen([sys.executable, "-m", "biopsy", "batch", str(manifest), "--out",
                               str(out), "--from-labels", "--no-progress"],
                              env=env | {"RANK": "0", "LOCAL_RANK": "0"}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("slides/*/summary.json")):  # its shard: the manifest's first row
            assert rank_0.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2)
        assert rank_0.poll() is None  # waiting for rank 1
        rank_0.send_signal(signal.SIGTERM)
        assert rank_0.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        for process in (rank_0, slowest):
            process.kill()
            process.wait()
