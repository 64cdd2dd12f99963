"""The watchdog's judgement (which ranks stalled), without processes; the real SIGSTOP / hang / local-error runs
are in test_distributed.py."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

from npt_ds.parallel.groups import flight_recorder_command, flight_recorder_env, free_port
from npt_ds.parallel.watchdog import Watchdog, interval_for
from npt_ds.train.faults import communication_failure


def watchdog(rank=0, world=3, timeout=10.0) -> Watchdog:
    dog = Watchdog(rank, world, timeout)
    now = time.monotonic()
    for r, peer in dog.peers.items():
        peer.record = {"beat": 5, "step": 12, "phase": "forward", "idle_s": 0.1, "waiting": False, "done": False}
        peer.beat_moved_at = now
    dog.last_round_trip = now
    return dog


def test_healthy_peers_are_not_named():
    assert watchdog().verdict() is None


def test_a_peer_whose_beat_stops_is_named_with_its_step_and_phase():
    dog = watchdog()
    now = time.monotonic()
    dog.peers[2].beat_moved_at = now - 11
    found = dog.verdict(now)
    assert found.stalled == [2] and found.steps == {2: 12} and found.phases == {2: "forward"}
    assert "sent no heartbeat for 11 s" in found.describe() and "step 12, phase forward" in found.describe()


def test_a_stuck_loop_is_named_and_its_waiting_victims_are_not():
    dog = watchdog()
    dog.peers[1].record.update(idle_s=12.0, waiting=False)  # stuck in a kernel or a read
    dog.peers[2].record.update(idle_s=11.5, waiting=True)  # blocked in the collective that waits for rank 1
    found = dog.verdict()
    assert found.stalled == [1] and "made no progress for 12 s while not waiting" in found.describe()


def test_an_unreachable_store_names_rank_0_and_a_finished_peer_is_never_named():
    dog = watchdog(rank=1)
    now = time.monotonic()
    dog.last_round_trip = now - 10.5
    dog.peers[2].record["done"] = True
    dog.peers[2].beat_moved_at = now - 60
    found = dog.verdict(now)
    assert found.stalled == [0] and "hosts the rendezvous store" in found.describe()
    assert watchdog(rank=0).verdict(now + 0.5) is None  # rank 0 is the store: it never names itself


def test_a_stopped_rank_0_is_named_as_the_store_host_while_its_beat_crosses_the_limit_first():
    """SIGSTOP on rank 0 stops its beat and its store together; the beat was last seen moving a beat before the
    last round trip, so it passes the limit first: rank 0 is named as the store host that does not answer, not as a
    peer that only stopped beating (CI at 213bfa4: the SIGSTOP run named the beat).  With the store answering, a
    stopped beat of rank 0 is its heartbeat alone."""
    dog = watchdog(rank=1)
    now = time.monotonic()
    dog.peers[0].beat_moved_at = now - 10.5
    dog.last_round_trip = now - 9.5  # under the limit, past the store's grace
    found = dog.verdict(now)
    assert found.stalled == [0] and "hosts the rendezvous store" in found.describe(), found.describe()
    dog.last_round_trip = now - 0.5
    found = dog.verdict(now)
    assert found.stalled == [0] and "sent no heartbeat for 10 s" in found.describe()


RAISES_WHILE_BEATING = textwrap.dedent("""
    import datetime, json, sys, time
    import torch.distributed as dist
    from npt_ds.parallel.watchdog import KEY, Watchdog

    class SlowToFinalise:  # keeps Python finalising for 1 s (its globals are torn down then)
        def __del__(self):
            time.sleep(1.0)

    keep = SlowToFinalise()
    port = int(sys.argv[1])
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=5))
    store.set(KEY.format(0), json.dumps({"beat": 1, "step": 0, "phase": "forward", "done": False}))
    dog = Watchdog(1, 2, 2.0, store_host="127.0.0.1", store_port=port).start()
    assert dog._threads
    store.delete_key(KEY.format(0))  # each heartbeat read now waits out the client's 0.4 s timeout ...
    dog.interval = 0.0  # ... back to back: the thread is almost always inside a store call
    time.sleep(0.6)
    raise RuntimeError("this rank's own error")
""")


def test_a_rank_that_raises_exits_1_not_by_an_abort_of_its_heartbeat_thread():
    """A store call of the daemon heartbeat that returns while Python finalises ends its thread by a forced unwind
    through C++ frames, which aborts the process ("terminate called without an active exception", -6: the launcher
    reported 250 for a rank's own error).  The watchdog ends its threads at exit, so the error's exit 1 stands.
    (Without that: 5 aborts in 5 runs of this script; with it, 5 exits 1.)"""
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", RAISES_WHILE_BEATING, str(free_port())], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "this rank's own error" in proc.stderr and "terminate called" not in proc.stderr


def test_a_world_of_one_or_a_zero_timeout_starts_no_threads():
    assert not Watchdog(0, 1, 10).start()._threads
    assert not Watchdog(0, 2, 0).start()._threads
    assert Watchdog(0, 2, 0).lost_peers() is None


@pytest.mark.parametrize("timeout, world, interval", [(300, 2, 1.0), (6, 2, 0.6), (1, 2, 0.2), (300, 512, 8.0)])
def test_the_heartbeat_interval(timeout, world, interval):
    assert interval_for(timeout, world) == pytest.approx(interval)


@pytest.mark.parametrize("exc, peer", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5018"), True),
    (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to "
                  "complete"), True),
    (dist.DistBackendError("NCCL communicator was aborted"), True),  # a candidate: the heartbeats decide
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled cuda error"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("timed out reading the shard"), False),
])
def test_only_collective_failures_are_candidates_for_a_lost_peer(exc, peer):
    assert communication_failure(exc) is peer


def test_the_flight_recorder_settings(tmp_path):
    env = flight_recorder_env(tmp_path)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == env["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "nccl-trace" / "rank_")
    assert flight_recorder_command(tmp_path) == f"torchfrtrace {tmp_path / 'nccl-trace'} --prefix rank_ --allow-incomplete-ranks"
