import pytest


@pytest.fixture(autouse=True)
def _task_identity():
    """What a SuperNode sets before it calls a ClientApp (tests call ClientApps directly); restored after."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = before
