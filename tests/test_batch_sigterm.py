import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
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
    errors = (tmp_path / "rank-0.err").open("w")
    rank_0 = subprocess.Popen([sys.executable, "-m", "biopsy", "batch", str(manifest), "--out",
                               str(out), "--from-labels", "--no-progress"],
                              env=env | {"RANK": "0", "LOCAL_RANK": "0"},
                              stderr=errors)
    try:
        deadline = time.monotonic() + 120
        status = out / "status" / "rank-0.csv"  # its shard (the first row) scored: done
        while not (status.is_file() and ",done," in status.read_text()):
            assert rank_0.poll() is None, (tmp_path / "rank-0.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        while True:  # then idle (at the barrier), however slow the machine
            used = cpu_seconds(rank_0.pid)
            time.sleep(1)
            if cpu_seconds(rank_0.pid) - used < 0.05:
                break
            assert time.monotonic() < deadline
        assert rank_0.poll() is None  # waiting for rank 1
        rank_0.send_signal(signal.SIGTERM)
        assert rank_0.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        for process in (rank_0, slowest):
            process.kill()
            process.wait()
        errors.close()
