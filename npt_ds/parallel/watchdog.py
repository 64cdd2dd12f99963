"""A host-side watchdog that names a rank that stops making progress, whatever the backend.

Under NCCL a collective only enqueues work: a rank waiting for a dead or stalled peer blocks on its device, not in
Python, until NCCL's own watchdog aborts the process (``distributed.timeout_s``) without saying who was missing.
Here every rank runs two daemon threads:

* the *heartbeat* publishes, through its own client of the rendezvous store (``MASTER_ADDR:MASTER_PORT``), a beat
  counter and what the training loop last reported with :meth:`Watchdog.progress`: the step, the phase, how long
  ago (on this rank's clock: no clocks are compared across hosts), and whether the loop is waiting on its peers
  right now (inside a collective, :data:`~npt_ds.parallel.groups.WAIT`).  A live thread does not count as progress:
  only the loop's own calls do.  It reads every peer's record with one ``multi_get``.
* the *judge* decides, every interval, from what the heartbeat last read:
  - a peer whose beat has not changed for ``timeout_s`` is frozen or gone (SIGSTOP, a dead host);
  - a peer whose loop has not progressed for ``timeout_s`` while not waiting on others is stuck on its own (a
    kernel, a filesystem read); ranks that wait in a collective for it are its victims, not named;
  - when the heartbeat has not completed a round trip for ``timeout_s``, the store is unreachable: it lives in
    rank 0's process, so rank 0 is named (store calls are bounded by the store client's timeout, and the judge
    does not wait on them).
  Then every live rank prints one line naming the stalled ranks with their step and phase, the lowest live rank
  writes the ``abort`` event, stalled ranks on this host are SIGKILLed (the launcher would otherwise give a process
  that cannot answer its 30 s SIGTERM grace), and the process exits 4 (``MAX_RESTARTS`` / a requeue relaunches it).

The same records answer the main thread after a failed collective (:meth:`Watchdog.lost_peers`): a peer whose beat
stops is lost; when every peer still beats, the error was this rank's own and is raised as such.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch.distributed as dist

from .groups import WAIT

KEY = "npt-ds/heartbeat/{}"
EXIT_STALLED = 4


@dataclass
class PeerView:
    """What this rank knows of one peer (its last record and when, on this rank's clock, its beat last moved)."""

    record: dict = field(default_factory=dict)
    beat_moved_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Verdict:
    stalled: list[int]  # ranks named
    why: dict[int, str]  # rank -> one phrase
    steps: dict[int, int | None]
    phases: dict[int, str | None]
    reason: str  # "stalled" | "lost"

    def describe(self) -> str:
        return "; ".join(f"rank {r} {self.why[r]}" for r in self.stalled)


def interval_for(timeout_s: float, world: int) -> float:
    """Seconds between heartbeats: a tenth of the timeout (at most 1 s), longer on big worlds, where every rank
    reads every record through rank 0's store (one multi_get of `world` keys per rank per beat)."""
    return max(0.2, min(1.0, timeout_s / 10), world / 64)


class Watchdog:
    """Start it once the process group exists; call :meth:`progress` from the training loop; :meth:`stop` at the end."""

    def __init__(self, rank: int, world: int, timeout_s: float, on_abort: Callable[[Verdict], None] | None = None,
                 store_host: str | None = None, store_port: int | None = None):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.interval = interval_for(self.timeout_s, world)
        self.on_abort = on_abort
        self.store_host = store_host or os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.store_port = int(store_port or os.environ.get("MASTER_PORT", "29500"))
        self.step: int | None = None
        self.phase = "setup"
        self.ticks = 0
        self.last_progress = time.monotonic()
        self.longest_pause = (0.0, "setup")  # the longest gap between two progress marks, and the phase it was in
        self.peers = {r: PeerView() for r in range(world) if r != rank}
        self.last_round_trip = time.monotonic()
        self.done = threading.Event()
        self._store = None
        self._lock = threading.Lock()
        self._aborted = False
        self._beat = 0
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ the loop's side
    def progress(self, step: int, phase: str) -> None:
        """The loop advanced (host arithmetic only: read by the heartbeat thread)."""
        now = time.monotonic()
        pause = now - self.last_progress
        if pause > self.longest_pause[0]:
            self.longest_pause = (pause, self.phase)
        self.step, self.phase, self.last_progress, self.ticks = step, phase, now, self.ticks + 1

    def start(self) -> "Watchdog":
        """Publish this rank's first record and read every peer's (waiting, bounded, until all have published: each
        rank then knows every peer's pid and host), then start the threads."""
        if self.world < 2 or self.timeout_s <= 0 or self._threads:
            return self
        self.last_progress = time.monotonic()
        try:
            self._store = self._client()
            self._publish_once()
            self._store.wait(self._keys, datetime.timedelta(seconds=max(30.0, self.timeout_s)))
            self._read_peers()
        except Exception as exc:  # noqa: BLE001 - say so and train on without it
            print(f"npt-ds: the watchdog cannot reach the rendezvous store {self.store_host}:{self.store_port} "
                  f"({type(exc).__name__}); a stalled rank will not be named", file=sys.stderr, flush=True)
            return self
        for peer in self.peers.values():
            peer.beat_moved_at = self.last_progress
        for target, name in ((self._heartbeat, "npt-ds-heartbeat"), (self._judge, "npt-ds-judge")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        atexit.register(self.halt)  # also when the loop raises: see halt()
        return self

    def stop(self) -> None:
        """The loop ended on purpose (peers stop judging this rank); the threads end."""
        self.phase = "done"
        self._publish_once()
        self.halt()

    def halt(self) -> None:
        """End the threads and wait for them (each store call is bounded by the client's timeout, 2 intervals).

        Run at interpreter exit too: a daemon thread still inside a store call when Python finalises is ended by
        a forced unwind through C++ frames, which aborts the process (SIGABRT: a rank that raised its own error
        then exited -6, not 1).  Publishes nothing: peers see this rank's beat stop, so an error exit is a lost
        rank to them, not a finished one."""
        self.done.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2 * self.interval + 1.0)

    @property
    def store_grace(self) -> float:
        """Seconds without a round trip after which the store is not answering: a healthy round trip comes every
        interval, each store call bounded by the client's timeout (2 intervals)."""
        return 3 * self.interval + 1.0

    # ------------------------------------------------------------------ the heartbeat thread
    def _client(self):
        return dist.TCPStore(self.store_host, self.store_port, is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=max(1.0, 2 * self.interval)))

    def _record(self) -> dict:
        waiting = WAIT.inside_since is not None
        return {"beat": self._beat, "step": self.step, "phase": self.phase, "ticks": self.ticks,
                "idle_s": round(time.monotonic() - self.last_progress, 3), "waiting": waiting,
                "pid": os.getpid(), "host": socket.gethostname(), "done": self.phase == "done"}

    def _publish_once(self) -> None:
        store = self._store
        if store is None:
            return
        try:
            self._beat += 1
            store.set(KEY.format(self.rank), json.dumps(self._record()))
        except Exception:  # noqa: BLE001 - the store host is gone; the judge names it
            pass

    @property
    def _keys(self) -> list[str]:
        return [KEY.format(r) for r in self.peers]

    def _read_peers(self) -> None:
        """One round trip: every peer's record (one multi_get)."""
        values = self._store.multi_get(self._keys)
        now = self.last_round_trip = time.monotonic()
        for r, raw in zip(self.peers, values):
            peer, record = self.peers[r], json.loads(raw)
            if record.get("beat") != peer.record.get("beat"):
                peer.beat_moved_at = now
            peer.record = record

    def _heartbeat(self) -> None:
        while not self.done.wait(self.interval):
            self._publish_once()
            try:
                self._read_peers()
            except Exception:  # noqa: BLE001 - unreachable (rank 0 stopped or gone): no round trip recorded
                pass

    # ------------------------------------------------------------------ judging
    def verdict(self, now: float | None = None) -> Verdict | None:
        """The ranks that stalled, by the rules in the module docstring (None: all is well)."""
        now = time.monotonic() if now is None else now
        limit = self.timeout_s
        why: dict[int, str] = {}
        silent = now - self.last_round_trip
        # rank 0 hosts the store: it is named as such when no round trip completes for the limit, or sooner when its
        # beat has also stopped (under SIGSTOP the beat, last seen moving up to an interval before the last round
        # trip, crosses the limit first)
        zero = self.peers.get(0)
        if self.rank != 0 and (silent > limit or (silent > self.store_grace and not zero.record.get("done")
                                                  and now - zero.beat_moved_at > limit)):
            why[0] = f"does not answer (it hosts the rendezvous store; no heartbeat round trip for {silent:.0f} s)"
        for r, peer in self.peers.items():
            rec = peer.record
            if rec.get("done") or r in why:
                continue
            frozen = now - peer.beat_moved_at
            if frozen > limit:
                why[r] = f"sent no heartbeat for {frozen:.0f} s (stopped, or its host is gone)"
            elif rec.get("idle_s", 0) > limit and not rec.get("waiting"):
                why[r] = f"made no progress for {rec['idle_s']:.0f} s while not waiting on its peers"
        if not why:
            return None
        stalled = sorted(why)
        for r in stalled:
            rec = self.peers[r].record if r in self.peers else {}
            where = ("(no heartbeat seen)" if not rec else f"in phase {rec.get('phase')}" if rec.get("step") is None
                     else f"at step {rec['step']}, phase {rec.get('phase')}")
            why[r] = f"{why[r]}, last seen {where}"
        return Verdict(stalled, why, {r: self.peers[r].record.get("step") if r in self.peers else None for r in stalled},
                       {r: self.peers[r].record.get("phase") if r in self.peers else None for r in stalled},
                       "stalled")

    def lost_peers(self) -> list[int] | None:
        """After a failed collective: the peers that are gone, judged over about three beats (a few seconds):
        those whose beat does not move (a record read just after the failure may still be an older beat, so the
        baseline is taken one beat later), and rank 0 when its store completes no round trip.  [] when every peer
        still beats (the error was this rank's own); None without a running watchdog."""
        if not self._threads:
            return None
        time.sleep(self.interval + 0.3)
        base = {r: p.record.get("beat") for r, p in self.peers.items()}
        trip = self.last_round_trip
        time.sleep(2 * self.interval + 0.5)
        gone = [r for r, p in self.peers.items() if not p.record.get("done") and p.record.get("beat") == base[r]]
        if self.rank != 0 and self.last_round_trip == trip:
            gone = sorted({0, *gone})
        return gone

    def _judge(self) -> None:
        while not self.done.wait(self.interval):
            found = self.verdict()
            if found is not None and self.rank not in found.stalled:
                self.abort(found)

    def abort(self, verdict: Verdict) -> None:
        """Once per process: report the verdict (``on_abort``), end stalled ranks on this host, exit 4."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        try:
            if self.on_abort is not None:
                self.on_abort(verdict)
        finally:
            self.kill_local(verdict.stalled)
            os._exit(EXIT_STALLED)

    def lowest_live(self, stalled: list[int]) -> int:
        return min(r for r in range(self.world) if r not in stalled)

    def kill_local(self, ranks: list[int], delay_s: float = 3.0) -> None:
        """SIGKILL the named ranks that run on this host (by the pid and host name they published), `delay_s`
        after this process exits: DeepSpeed's launcher (which polls once a second) then reports this rank's exit 4
        for the job, not the killed rank's -9, and need not wait its 30 s SIGTERM grace on a stopped process."""
        host = socket.gethostname()
        pids = [str(int(rec["pid"])) for r in ranks if (rec := self.peers.get(r, PeerView()).record).get("host") == host
                and rec.get("pid")]
        if pids:
            subprocess.Popen(["sh", "-c", f"sleep {delay_s}; kill -9 {' '.join(pids)} 2>/dev/null"],
                             start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
