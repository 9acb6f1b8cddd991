"""The warm runtime runs task after task in one process, loads each FAB's ClientApp once, survives a failing
task and a SuperNode that does not answer. The Runtime API is faked here; the real one runs in
tests/integration/test_deployment.py."""

from types import SimpleNamespace

import pytest

import fedtune.flower.warm_runtime as wr


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

    def pull(client):
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
