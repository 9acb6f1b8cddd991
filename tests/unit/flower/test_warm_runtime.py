"""The warm runtime runs task after task in one process, loads each FAB's ClientApp once, survives a failing
task and a SuperNode that does not answer. The Runtime API is faked here; the real one runs in
tests/integration/test_deployment.py."""

from types import SimpleNamespace

import pytest

import fedtune.flower.warm_runtime as wr

BOUNDED_PULL = wr.pull_task_input  # the real one, before the fixture fakes it


class FakeClient:
    def __init__(self, tasks):
        self.tasks, self.closed = tasks, False

    def AcquireTask(self, req):
        assert list(req.supported_task_types) == ["flwr-clientapp"]
        nxt = self.tasks.pop(0) if self.tasks else None
        if isinstance(nxt, Exception):
            raise nxt
        return SimpleNamespace(HasField=lambda f: nxt is not None, token=nxt or "",
                               task=SimpleNamespace(task_id=len(self.tasks)))

    def close(self):
        self.closed = True


class Heartbeat:
    def __init__(self, fn):
        self.is_running = False

    def start(self):
        self.is_running = True

    def stop(self):
        self.is_running = False


@pytest.fixture
def fake(monkeypatch):
    state = SimpleNamespace(pushed=[], outputs=[], loads=0, calls=[], fail_on=set())
    acquire = FakeClient(["t1", ConnectionError("SuperNode restarting"), "t2", None, "t3"])
    monkeypatch.setattr(wr, "_client", lambda addr, comp, token=None: acquire if token is None else FakeClient([]))
    monkeypatch.setattr(wr, "HeartbeatSender", Heartbeat)
    monkeypatch.setattr(wr, "make_task_heartbeat_fn_http", lambda c: None)

    def pull(client, max_seconds):
        n = len(state.calls) + 1
        return f"msg{n}", SimpleNamespace(n=n), SimpleNamespace(fab_id="f", fab_version="1"), \
            SimpleNamespace(hash_str="abc", content=b"")

    def app(message, context):
        state.calls.append(message)
        if context.n in state.fail_on:
            raise RuntimeError("out of memory")
        return f"reply-{message}"

    def load(self, run, fab):
        if fab.hash_str not in self._apps:
            state.loads += 1
            self._apps[fab.hash_str] = app
        return self._apps[fab.hash_str]

    monkeypatch.setattr(wr, "pull_task_input", pull)
    monkeypatch.setattr(wr, "push_message", lambda c, reply, ctx: state.pushed.append(reply))
    monkeypatch.setattr(wr, "push_task_output", lambda c, ctx, status, details: state.outputs.append(status))
    monkeypatch.setattr(wr.WarmRuntime, "_app", load)
    monkeypatch.setattr(wr, "Message", lambda err, reply_to: f"error-reply-to-{reply_to}")
    return state


def test_three_tasks_one_process_one_app_load(fake):
    rt = wr.WarmRuntime("127.0.0.1:1", poll_seconds=0.01)
    rt.serve(max_tasks=3)
    assert fake.calls == ["msg1", "msg2", "msg3"] and fake.loads == 1
    assert fake.pushed == ["reply-msg1", "reply-msg2", "reply-msg3"]
    assert [r.ok for r in rt.results] == [True, True, True]
    assert fake.outputs == [wr.SubStatus.COMPLETED] * 3


def test_a_failing_task_is_reported_and_the_next_one_runs(fake):
    fake.fail_on = {2}
    rt = wr.WarmRuntime("127.0.0.1:1", poll_seconds=0.01)
    rt.serve(max_tasks=3)
    assert [r.ok for r in rt.results] == [True, False, True]
    assert fake.pushed[1] == "error-reply-to-msg2" and "out of memory" in rt.results[1].details
    assert fake.outputs[1] == wr.SubStatus.FAILED


def test_an_orphan_task_whose_message_never_arrives_is_given_up_and_the_next_one_runs(fake, monkeypatch):
    """After a SuperLink restart the SuperNode can hold a task of the stopped run whose message content never
    arrives (the deployment test's crash scenario). The real bounded pull gives it up after ``pull_seconds``
    (Flower's own pull waits 2 hours, which in one warm process blocks every later round)."""
    import time

    from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse  # pylint: disable=E0611

    class NeverArrives:
        def PullTaskInput(self, req):
            return SimpleNamespace(task_id=7, run=SimpleNamespace(run_id=1), context=SimpleNamespace(node_id=2),
                                   fab=None)

        def PullMessages(self, req):
            return SimpleNamespace(messages_list=[object()], message_object_trees=[ObjectTree(object_id="ab" * 32)])

        def PullObject(self, req):
            return PullObjectResponse(object_found=True, object_available=False)

        def ConfirmMessageReceived(self, req):
            raise AssertionError("a message that never arrived was confirmed")

    monkeypatch.setattr(wr, "context_from_proto", lambda c: SimpleNamespace(node_id=2, run_id=1))
    monkeypatch.setattr(wr, "run_from_proto", lambda r: r)
    monkeypatch.setattr(wr, "fab_from_proto", lambda f: f)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="ab" * 32):
        BOUNDED_PULL(NeverArrives(), max_seconds=0.5)
    assert time.monotonic() - t0 < 10

    calls = []

    def pull(client, max_seconds):
        calls.append(max_seconds)
        if len(calls) == 1:
            return BOUNDED_PULL(NeverArrives(), max_seconds)
        return f"msg{len(calls)}", SimpleNamespace(n=len(calls)), SimpleNamespace(fab_id="f", fab_version="1"), \
            SimpleNamespace(hash_str="abc", content=b"")

    monkeypatch.setattr(wr, "pull_task_input", pull)
    rt = wr.WarmRuntime("127.0.0.1:1", poll_seconds=0.01, pull_seconds=0.5)
    rt.serve(max_tasks=2)
    assert [r.ok for r in rt.results] == [False, True] and calls == [0.5, 0.5]
    assert fake.outputs == [wr.SubStatus.FAILED, wr.SubStatus.COMPLETED] and fake.pushed == ["reply-msg2"]
