"""A device's warm ClientApp runtime: one long-lived process runs every round's ClientApp, so the base model
loads once per device instead of once per round.

Why: a Flower 1.42 SuperNode in its default ``--isolation subprocess`` starts ``flower-superexec``, which
starts a fresh ``flwr-clientapp`` process for every task (every round): each one re-imports torch and peft
and reloads (and re-quantizes) the base model. ``flwr-clientapp`` cannot be kept alive: it runs one task and
exits. With ``--isolation process`` the SuperNode only serves its Runtime API and leaves launching tasks to
an executor started outside it. This module is that executor, in-process:

1. poll the SuperNode's Runtime API for ClientApp tasks (``AcquireTask``, as ``flower-superexec`` does);
2. for each task, do what ``flwr-clientapp`` does (flwr/supernode/runtime/run_clientapp.py): pull the task
   input (message, context, run, FAB) with the task's token, install the FAB and load its ClientApp (once
   per FAB hash, then cached), call it, push the reply and the task's final status, heartbeat meanwhile;
3. do not exit: the process's module-level caches (the base model in ``fedtune.models.cache``, the device's
   tokenized data) survive into the next round.

One difference from ``flwr-clientapp``: pulling a task's message is bounded (``pull_seconds``, default 60 s,
not Flower's 2 hours). When a SuperLink restarts, a message of the old run can reach the SuperNode after that
run stopped; the SuperNode has already created its task but never receives its content (Flower 1.42,
``supernode/start_client_internal.py``). A process per task hangs on such an orphan alone; this one process
would hang with it and never run the new run's tasks, so it gives the orphan up and moves on.

Run as ``python -m fedtune.flower.warm_runtime --runtime-api-address 127.0.0.1:PORT [--parent-pid PID]``;
``fedtune device join`` starts it beside its SuperNode (fedtune/deploy/supernode.py).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger(__name__)


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def pull_task_input(client: RuntimeHttpClient, max_seconds: float):
    """flwr-clientapp's ``pull_task_input``, with the message pull bounded by ``max_seconds``."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    tree, node = pulled.message_object_trees[0], Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, max_time=max_seconds)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


@dataclass
class TaskResult:
    task_id: int
    ok: bool
    seconds: float
    details: str = ""


@dataclass
class WarmRuntime:
    """Runs a SuperNode's ClientApp tasks in this process, one after another, keeping what they cache."""

    runtime_api_address: str  # the SuperNode's Runtime API (loopback, no TLS: it never leaves the host)
    poll_seconds: float = 0.5
    pull_seconds: float = 60.0  # a task whose message has not arrived by then is an orphan (see above)
    results: list[TaskResult] = field(default_factory=list)
    _apps: dict[str, ClientApp] = field(default_factory=dict)

    def acquire(self, client: RuntimeHttpClient) -> tuple[str, int] | None:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            return res.token, int(res.task.task_id)
        return None

    def _app(self, run, fab) -> ClientApp:
        if fab.hash_str not in self._apps:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self._apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self._apps[fab.hash_str]

    def run_task(self, token: str, task_id: int) -> TaskResult:
        """One task, as ``flwr-clientapp`` runs it, but without leaving the process."""
        t0 = time.monotonic()
        client = _client(self.runtime_api_address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client, self.pull_seconds)
            reply = self._app(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # a failed round must not end the device's runtime
            log.exception("ClientApp task %d raised", task_id)
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # the SuperNode went away mid-task: the round times out on the server
                log.exception("pushing the reply of task %d failed", task_id)
                status = SubStatus.FAILED
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        result = TaskResult(task_id, status == SubStatus.COMPLETED, time.monotonic() - t0, details)
        self.results.append(result)
        log.info("task %d %s in %.1fs (tasks run by this process: %d)", task_id,
                 "done" if result.ok else "failed", result.seconds, len(self.results))
        return result

    def serve(self, stop: threading.Event | None = None, max_tasks: int | None = None) -> None:
        """Poll for tasks until ``stop`` is set (or ``max_tasks`` ran); outlives SuperNode restarts."""
        stop = stop or threading.Event()
        client = _client(self.runtime_api_address, "SuperExec")
        try:
            while not stop.is_set() and (max_tasks is None or len(self.results) < max_tasks):
                try:
                    acquired = self.acquire(client)
                except Exception as err:  # the SuperNode is (re)starting: ask again
                    log.debug("Runtime API at %s not answering: %s", self.runtime_api_address, err)
                    acquired = None
                if acquired is not None:
                    self.run_task(*acquired)
                else:
                    stop.wait(self.poll_seconds)
        finally:
            client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedtune's warm ClientApp runtime for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API HOST:PORT")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    parser.add_argument("--pull-seconds", type=float, default=60.0,
                        help="give up a task whose message has not arrived after this long (an orphan)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll of the Runtime API
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    log.info("warm ClientApp runtime polling %s", args.runtime_api_address)
    try:
        WarmRuntime(args.runtime_api_address, args.poll_seconds, args.pull_seconds).serve()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
