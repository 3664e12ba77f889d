"""Unit tests without worker processes: exit decoding, escalation, the wire, the Board."""

from __future__ import annotations

import builtins
import importlib
import mmap
import os
import pickle
import select
import shutil
import signal
import sys
import threading
import traceback
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import pytest
import targets

from procctl import Outcome, ProcessController, State, shutdown
from procctl.channel import (
    ACK,
    ACK_BODY,
    FRAME_HEADER,
    RESULT,
    START_FAILED,
    Board,
    ControlEnd,
    WorkerLink,
    pack_command,
    unpack_command,
)
from procctl.states import SYS_EXIT_NOTE, Event, WorkerReport, error_line
from procctl.worker import Payload

# -- exit decoding ---------------------------------------------------------------


def test_describe_exit():
    cases = {
        None: "did not exit",
        0: "exited with code 0",
        3: "exited with code 3",
        255: "exited with code 255",
        -9: "was killed by SIGKILL",
        -15: "was killed by SIGTERM",
        -11: "was killed by SIGSEGV",
        -200: "was killed by signal 200",
    }
    assert {code: shutdown.describe_exit(code) for code in cases} == cases


def test_signal_name():
    assert shutdown.signal_name(signal.SIGINT) == "SIGINT"
    assert shutdown.signal_name(999) == "signal 999"


@pytest.mark.parametrize(
    "code, must, must_not",
    [
        (-9, ["SIGKILL", "kill -9", "out-of-memory", "without reporting"], []),
        (-11, ["SIGSEGV", "segmentation fault"], ["kill -9"]),
        (-15, ["SIGTERM", "without reporting"], ["kill -9", "segmentation", "os._exit"]),
        (7, ["exited with code 7", "os._exit"], ["SIG"]),
        (0, ["exited with code 0", "without reporting"], []),
        (None, ["did not exit"], ["os._exit", "kill -9"]),
    ],
)
def test_crash_message(code, must, must_not):
    msg = shutdown.crash_message(code)
    assert msg.startswith("the worker process ")
    for m in must:
        assert m in msg
    for m in must_not:
        assert m not in msg


# -- escalation ------------------------------------------------------------------


class FakeWorkers:
    """Ends when it has received the signals in `ends_after`."""

    def __init__(self, ends_after):
        self.ends_after = ends_after  # None: never; [] at once; [SIGTERM]...
        self.sent: list[int] = []
        self.waits: list[float | None] = []

    def wait_ended(self, timeout):
        self.waits.append(timeout)
        return self.ends_after is not None and self.sent[: len(self.ends_after)] == self.ends_after

    def signal_live(self, sig):
        self.sent.append(sig)
        return [0]


def test_escalate_ends_within_grace():
    f = FakeWorkers([])
    assert shutdown.escalate(f, 2.0, 0.5, 5.0) is True
    assert f.sent == [] and f.waits == [2.0]


def test_escalate_sigterm_then_done():
    f = FakeWorkers([signal.SIGTERM])
    assert shutdown.escalate(f, 2.0, 0.5, 5.0) is True
    assert f.sent == [signal.SIGTERM]
    assert f.waits == [2.0, 0.5]


def test_escalate_to_sigkill():
    f = FakeWorkers([signal.SIGTERM, signal.SIGKILL])
    assert shutdown.escalate(f, 1.0, 0.5, 5.0) is True
    assert f.sent == [signal.SIGTERM, signal.SIGKILL]
    assert f.waits == [1.0, 0.5, 5.0]


def test_escalate_gives_up_after_sigkill():
    f = FakeWorkers(None)
    assert shutdown.escalate(f, 0.0, 0.5, 5.0) is False
    assert f.sent == [signal.SIGTERM, signal.SIGKILL]
    assert len(f.waits) == 3  # bounded: never waits a fourth time


# -- the decision logic of the controller -------------------------------------------------


def _w(**kw):
    base = dict(id=1, pid=1234, started=100.0, result=None, start_error=None, signalled=None, hung=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def decode():
    return ProcessController(targets.loop, 1, start_method="fork")._decode


def test_decode_result_wins(decode):
    r = decode(_w(result=("finished", 42, None), signalled=signal.SIGTERM), 0)
    assert (r.outcome, r.result, r.error, r.exitcode) == (Outcome.FINISHED, 42, None, 0)
    assert (r.worker_id, r.pid, r.started) == (1, 1234, 100.0)
    assert r.ended >= r.started


def test_decode_failed_result(decode):
    r = decode(_w(result=("failed", None, "Traceback...\nValueError: x\n")), 0)
    assert r.outcome is Outcome.FAILED and r.error_line == "ValueError: x"


def test_decode_start_error(decode):
    r = decode(_w(start_error="Traceback...\nModuleNotFoundError: nope\n"), 3)
    assert r.outcome is Outcome.FAILED and "ModuleNotFoundError" in r.error


def test_decode_killed_by_controller(decode):
    r = decode(_w(signalled=signal.SIGKILL), -9)
    assert r.outcome is Outcome.KILLED and r.exitcode == -9
    assert "SIGKILL" in r.error


def test_decode_signalled_but_exited_by_itself_is_crashed(decode):
    r = decode(_w(signalled=signal.SIGTERM), 5)
    assert r.outcome is Outcome.CRASHED and r.exitcode == 5
    assert "exited with code 5" in r.error


@pytest.mark.parametrize("code", [-9, -11, 0, 7])
def test_decode_died_without_report_is_crashed(decode, code):
    r = decode(_w(), code)
    assert r.outcome is Outcome.CRASHED and r.exitcode == code
    assert r.error == shutdown.crash_message(code)


# -- commands ------------------------------------------------------------------------


def test_pack_unpack_command():
    for seq in (0, 1, 255, 256, 2**40, 2**54):
        for state in State:
            word = pack_command(seq, state)
            assert unpack_command(word) == (seq, state)
            assert -(2**63) <= word < 2**63  # fits a board word


def test_later_commands_pack_differently():
    assert pack_command(1, State.RUNNING) != pack_command(2, State.RUNNING)


# -- the Board ------------------------------------------------------------------------


def test_board_slots_are_independent():
    b = Board(8)
    try:
        assert b.size >= mmap.PAGESIZE
        for i in range(8):
            b.post(i, pack_command(i + 1, State.RUNNING))
            b.set_progress(i, float(i), 10.0 * i)
        for i in range(8):
            assert unpack_command(b.command(i)) == (i + 1, State.RUNNING)
            assert b.progress(i) == (float(i), 10.0 * i)
    finally:
        b.close()


def test_board_is_shared_through_its_fd():
    owner = Board(300)
    try:
        assert owner.size >= 300 * 4 * 8
        other = Board(300, fd=os.dup(owner.fd))
        assert other.fd == -1  # the mapping outlives the fd
        owner.post(299, pack_command(7, State.PAUSED))
        assert unpack_command(other.command(299)) == (7, State.PAUSED)
        other.set_progress(299, 5.0, float("nan"))
        done, total = owner.progress(299)
        assert done == 5.0 and total != total
        other.close()
        other.close()
    finally:
        owner.close()
    owner.close()  # idempotent


def test_board_close_releases_the_fd():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        Board(4).close()
    assert len(os.listdir("/proc/self/fd")) == before


# -- framing ----------------------------------------------------------------------------


@pytest.fixture
def wire():
    """A manager end and a worker end over a real socket pair, in this process."""
    before = len(os.listdir("/proc/self/fd"))
    board = Board(1)
    link = WorkerLink()
    doorbell, report = link.child_fds()
    end = ControlEnd(0, board, doorbell.detach(), report.detach())
    link._child = -1  # the worker's end owns it now (one process here)
    yield link, end
    link.close()
    link.close()
    if end.report_fd >= 0:
        end.close()
    board.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_ack_frame_round_trip(wire):
    link, end = wire
    end.ack(5, State.RUNNING)
    end.ack(6, State.PAUSED)
    frames, eof = link.read_frames()
    assert eof is False
    assert frames == [(ACK, ACK_BODY.pack(5, 2)), (ACK, ACK_BODY.pack(6, 1))]
    assert [ACK_BODY.unpack(p) for _, p in frames] == [(5, 2), (6, 1)]
    assert link.read_frames() == ([], False)
    assert not link.partial


def test_nothing_to_read_does_not_block(wire):
    link, _ = wire
    assert link.read_frames() == ([], False)


def test_partial_frame_is_kept_until_complete(wire):
    link, end = wire
    payload = b"abcdef"
    raw = FRAME_HEADER.pack(RESULT, len(payload)) + payload
    os.write(end.report_fd, raw[:3])  # half a header
    assert link.read_frames() == ([], False)
    assert link.partial
    os.write(end.report_fd, raw[3:-2])  # header and part of the body
    assert link.read_frames() == ([], False)
    os.write(end.report_fd, raw[-2:] + FRAME_HEADER.pack(START_FAILED, 0))
    frames, _ = link.read_frames()
    assert frames == [(RESULT, payload), (START_FAILED, b"")]
    assert not link.partial


def test_big_frame_arrives_whole_through_a_small_pipe(wire):
    link, end = wire
    payload = os.urandom(1 << 16) * 80  # 5 MiB, far more than the pipe holds
    writer = threading.Thread(target=end.send, args=(RESULT, payload))
    writer.start()
    got = []
    while not got:
        ready, _, _ = select.select([link.report_fd], [], [], 10)
        assert ready, "the writer stalled"
        frames, _ = link.read_frames()
        got += frames
    writer.join(10)
    assert got == [(RESULT, payload)]


def test_eof_when_the_worker_end_closes(wire):
    link, end = wire
    end.ack(1, State.STOPPED)
    end.close()
    end.report_fd = -1  # closed already: do not close it twice
    frames, eof = link.read_frames()
    assert frames == [(ACK, ACK_BODY.pack(1, 0))]
    if not eof:
        frames, eof = link.read_frames()
    assert eof is True


def test_doorbell_never_blocks_the_manager(wire):
    link, end = wire
    for _ in range(70_000):  # more than a pipe holds (64 KiB)
        link.ring()
    ready, _, _ = select.select([end.doorbell_fd], [], [], 0)
    assert ready
    end.drain_doorbell()
    ready, _, _ = select.select([end.doorbell_fd], [], [], 0)
    assert not ready
    end.drain_doorbell()  # an empty doorbell does not block either


def test_ring_after_the_worker_is_gone(wire):
    link, end = wire
    end.close()
    end.report_fd = -1
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        link.ring()  # BrokenPipe is swallowed
    finally:
        signal.signal(signal.SIGPIPE, old)


def test_worker_reads_commands_from_the_board(wire):
    link, end = wire
    end.board.post(0, pack_command(3, State.RUNNING))
    assert unpack_command(end.command()) == (3, State.RUNNING)


# -- the payload -------------------------------------------------------------------------


def test_payload_pickles_into_an_opaque_blob():
    p = Payload(targets.loop, (5,), {"limit": 3})
    blob = bytes(ForkingPickler.dumps(p))
    back = pickle.loads(blob)
    assert back.load() == (targets.loop, (5,), {"limit": 3})


def test_payload_that_cannot_be_imported_fails_at_load_not_at_unpickle(tmp_path):
    (tmp_path / "gone_mod.py").write_text("def work(ctx):\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("gone_mod")
        blob = bytes(ForkingPickler.dumps(Payload(mod.work, (), {})))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_mod", None)
    (tmp_path / "gone_mod.py").unlink()
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    deferred = pickle.loads(blob)  # fine: the target is still opaque
    with pytest.raises(ModuleNotFoundError):
        deferred.load()


def test_payload_of_a_lambda_cannot_be_pickled():
    with pytest.raises(Exception):  # noqa: B017 - pickle raises several types here
        ForkingPickler.dumps(Payload(lambda ctx: 1, (), {}))


# -- records --------------------------------------------------------------------------


def test_worker_report_duration_and_error_line():
    r = WorkerReport(0, 10, Outcome.FAILED, None, "Traceback:\n  x\nValueError: bad\n\n", 0, 5.0, 7.5)
    assert r.duration == 2.5
    assert r.error_line == "ValueError: bad"
    assert WorkerReport(0, 10, Outcome.FINISHED, 1, None, 0, 5.0, 4.0).duration == 0.0
    assert WorkerReport(0, 10, Outcome.FINISHED).error_line is None


def test_outcome_str_is_its_value():
    assert str(Outcome.KILLED) == "killed"
    assert f"{Outcome.STOPPED}" == "stopped"


def test_event_to_dict_drops_none():
    assert Event(0.5, "running", worker=3).to_dict() == {"t": 0.5, "event": "running", "worker": 3}


def test_a_command_posted_while_a_stale_ring_is_drained_is_not_missed():
    """A worker woken by a ring for a command it had already read drains the
    doorbell; a command posted between a look at the board and that drain
    rang too, and its ring goes with the stale one: the worker must read the
    board after the drain (else it sleeps on, and the command's broadcast
    times out)."""
    from procctl.channel import pack_command
    from procctl.worker import WorkerContext

    paused, running = pack_command(5, State.PAUSED.value), pack_command(6, State.RUNNING.value)

    class End:
        worker = 0
        word = paused
        board = SimpleNamespace(set_beat=lambda worker, probe: None)
        acked: list = []

        def command(self):
            return self.word

        def drain_doorbell(self):
            self.word = running  # the manager posted (and rang) just before this drain

        def ack(self, seq, state):
            self.acked.append((seq, state))

    ctx = WorkerContext.__new__(WorkerContext)
    ctx._manager_fd, ctx._term_r, ctx._end, ctx._applied = 100, 101, End(), paused
    ctx.state, ctx._info_pending, ctx._beat_done, ctx._beat_lock = State.PAUSED, False, False, threading.Lock()
    ctx._on_wake(102)  # the doorbell
    applied = [seq for seq, _ in ctx._end.acked]
    assert applied == [6] and ctx.state is State.RUNNING


def _formatted(raise_it) -> str:
    try:
        raise_it()
    except BaseException:  # noqa: BLE001
        return traceback.format_exc()
    raise AssertionError("nothing raised")


def _chained() -> None:
    try:
        raise KeyError("inner")
    except KeyError as exc:
        raise RuntimeError("outer\nmore") from exc


def _noted() -> None:
    exc = ValueError("bad")
    exc.add_note("a note after it")
    raise exc


def _group() -> None:
    raise builtins.ExceptionGroup("two went wrong", [ValueError("a"), TypeError("b")])


def _from_a_group() -> None:
    try:
        _group()
    except BaseException as exc:
        raise RuntimeError("final") from exc


def _lookup(table: dict) -> object:
    return table["missing"]


def _continued() -> None:
    # A source line of the traceback that begins with '+ ' (or '| '): not the exception.
    print("never",
          + len(str(_lookup({}))))


def _empty_first_line() -> None:
    raise ValueError("\nsecond")


NEEDS_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes and groups are Python 3.11's")


@pytest.mark.parametrize("raise_it, expected", [
    (lambda: (_ for _ in ()).throw(ValueError("first line\nsecond line")), "ValueError: first line"),
    (_chained, "RuntimeError: outer"),
    pytest.param(_noted, "ValueError: bad", marks=NEEDS_311),
    pytest.param(_group, "ExceptionGroup: two went wrong (2 sub-exceptions)", marks=NEEDS_311),
    pytest.param(_from_a_group, "RuntimeError: final", marks=NEEDS_311),
    (_continued, "KeyError: 'missing'"),
    (_empty_first_line, "ValueError: second"),
    (lambda: sys.exit(0), "SystemExit: 0"),
], ids=["several-lines", "chained", "noted", "group", "from-a-group", "source-line-with-plus", "empty-first-line",
        "sys.exit"])
def test_error_line_is_the_exception_of_a_traceback(raise_it, expected):
    assert error_line(_formatted(raise_it)) == expected


def test_error_line_of_what_is_no_traceback():
    sys_exit = _formatted(lambda: sys.exit(3)) + f"{SYS_EXIT_NOTE}3)\n"
    assert error_line(sys_exit) == "the target called sys.exit(3)"  # the worker's note says it best
    assert error_line("killed by the controller with SIGKILL") == "killed by the controller with SIGKILL"
    assert error_line("crashed\nexit code -11 (SIGSEGV)\n") == "exit code -11 (SIGSEGV)"
    assert error_line("| x") == "| x"  # no traceback: the text as it is
    assert error_line("") is None and error_line(None) is None and error_line(" \n") is None
