"""The memory budget for requests in flight (service/memory.py): the container's limit found through fake /proc and
/sys trees (cgroup v1 and v2, with and without a cgroup namespace, unlimited), and admission against the budget."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.memory import MIB, MemoryBudget, MemoryLimit, OverBudget, container_memory_limit
from service.settings import load_settings
from tests.support.models import linear_model, lookup_model
from tests.support.waiting import wait_loaded

GIB = 1024 * MIB
V1_UNLIMITED = "9223372036854771712"
V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw"
V1_MOUNT = "35 31 0:32 {root} /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"


def fake_tree(tmp_path: Path, cgroup: str, mountinfo: list[str], files: dict[str, str]) -> Path:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text(cgroup)
    (tmp_path / "proc" / "self" / "mountinfo").write_text("\n".join(mountinfo) + "\n")
    for path, text in files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
    return tmp_path


def test_v2_in_a_cgroup_namespace(tmp_path):
    root = fake_tree(tmp_path, "0::/\n", [V2_MOUNT], {"/sys/fs/cgroup/memory.max": str(2 * GIB)})
    assert container_memory_limit(root=root) == MemoryLimit(2 * GIB, "cgroup v2 /sys/fs/cgroup/memory.max")


def test_v2_without_a_namespace_takes_the_tightest_limit_up_the_tree(tmp_path):
    leaf = "/sys/fs/cgroup/system.slice/docker-abc.scope"
    root = fake_tree(tmp_path, "0::/system.slice/docker-abc.scope\n", [V2_MOUNT], {
        f"{leaf}/memory.max": str(GIB), "/sys/fs/cgroup/system.slice/memory.max": str(512 * MIB),
        "/sys/fs/cgroup/memory.max": "max",
    })
    assert container_memory_limit(root=root) == MemoryLimit(
        512 * MIB, "cgroup v2 /sys/fs/cgroup/system.slice/memory.max")


def test_v2_unlimited_falls_back_to_the_setting_or_to_none(tmp_path):
    root = fake_tree(tmp_path, "0::/\n", [V2_MOUNT], {"/sys/fs/cgroup/memory.max": "max"})
    assert container_memory_limit(3 * GIB, root=root) == MemoryLimit(3 * GIB, "MEMORY_LIMIT_BYTES")
    assert container_memory_limit(root=root).bytes is None


def test_v1_in_a_cgroup_namespace(tmp_path):
    root = fake_tree(tmp_path, "5:cpu,memory:/\n0::/\n", [V1_MOUNT.format(root="/")],
                     {"/sys/fs/cgroup/memory/memory.limit_in_bytes": str(2 * GIB)})
    assert container_memory_limit(root=root) == MemoryLimit(
        2 * GIB, "cgroup v1 /sys/fs/cgroup/memory/memory.limit_in_bytes")


def test_v1_without_a_namespace_whose_mount_is_its_own_cgroup(tmp_path):
    # Docker without cgroupns: /proc/self/cgroup shows the host's path, and the mount's root is that same cgroup.
    root = fake_tree(tmp_path, "4:memory:/docker/abc\n", [V1_MOUNT.format(root="/docker/abc")],
                     {"/sys/fs/cgroup/memory/memory.limit_in_bytes": str(GIB)})
    assert container_memory_limit(root=root).bytes == GIB


def test_v1_on_the_host_hierarchy_reads_the_process_cgroup_below_the_mount(tmp_path):
    root = fake_tree(tmp_path, "4:memory:/process_api/ab2d\n", [V1_MOUNT.format(root="/")], {
        "/sys/fs/cgroup/memory/process_api/ab2d/memory.limit_in_bytes": str(GIB),
        "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes": V1_UNLIMITED,
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
    })
    assert container_memory_limit(root=root) == MemoryLimit(
        GIB, "cgroup v1 /sys/fs/cgroup/memory/process_api/ab2d/memory.limit_in_bytes")


def test_v1_unlimited_and_a_hybrid_host_whose_v2_has_no_memory_controller(tmp_path):
    unified = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw"
    root = fake_tree(tmp_path, "4:memory:/\n0::/\n", [V1_MOUNT.format(root="/"), unified],
                     {"/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED})
    assert container_memory_limit(root=root).bytes is None
    (root / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text(str(GIB))
    assert container_memory_limit(root=root).bytes == GIB


def test_the_setting_wins_only_when_lower(tmp_path):
    root = fake_tree(tmp_path, "0::/\n", [V2_MOUNT], {"/sys/fs/cgroup/memory.max": str(2 * GIB)})
    assert container_memory_limit(GIB, root=root) == MemoryLimit(GIB, "MEMORY_LIMIT_BYTES")
    assert container_memory_limit(4 * GIB, root=root).bytes == 2 * GIB


def test_no_proc_at_all_is_no_limit(tmp_path):
    assert container_memory_limit(root=tmp_path).bytes is None


def budget_of(total: int, wait: float = 0.3) -> MemoryBudget:
    budget = MemoryBudget(MemoryLimit(4 * total, "test"), wait_seconds=wait)
    budget.total = total
    return budget


def test_requests_are_admitted_in_order_while_they_fit_and_wait_for_room():
    async def scenario():
        budget = budget_of(100 * MIB)
        await budget.admit(60 * MIB)
        waiting = asyncio.ensure_future(budget.admit(60 * MIB))
        await asyncio.sleep(0.05)
        assert not waiting.done() and budget.as_json()["waiting"] == 1
        budget.release(60 * MIB)
        await asyncio.wait_for(waiting, 1)
        assert budget.in_use == 60 * MIB and budget.peak == 60 * MIB

    asyncio.run(scenario())


def test_a_request_that_finds_no_room_in_time_gets_503_that_says_why():
    async def scenario():
        budget = budget_of(100 * MIB)
        await budget.admit(90 * MIB)
        with pytest.raises(OverBudget) as refused:
            await budget.admit(20 * MIB)
        assert refused.value.status == 503 and "retry" in str(refused.value)
        assert budget.in_use == 90 * MIB and budget.refused == 1 and budget.as_json()["waiting"] == 0

    asyncio.run(scenario())


def test_a_request_larger_than_the_whole_budget_gets_413_naming_the_fix():
    async def scenario():
        with pytest.raises(OverBudget) as refused:
            await budget_of(100 * MIB).admit(200 * MIB)
        assert refused.value.status == 413 and "fewer rows" in str(refused.value)

    asyncio.run(scenario())


def test_no_limit_means_no_budget():
    async def scenario():
        budget = MemoryBudget(MemoryLimit(None, "none"))
        budget.measure()
        await budget.admit(10 * GIB)
        assert budget.as_json()["budget_bytes"] is None and budget.in_use == 0

    asyncio.run(scenario())


def test_the_budget_is_the_workers_share_less_what_the_process_holds_and_room_to_decode():
    budget = MemoryBudget(MemoryLimit(4 * GIB, "test"), workers=2)
    budget.measure(decoders=2, largest_body=16 * MIB)
    assert 0 < budget.baseline < GIB
    assert budget.decode_reserve == 2 * 16 * MIB * 8
    assert budget.total == 2 * GIB - budget.baseline - 2 * GIB // 8 - budget.decode_reserve
    assert budget.as_json()["budget_bytes"] == budget.total


# --- the budget in the app (in-process, real onnxruntime session) ---------------------------------------------


@pytest.fixture
def service(tmp_path):
    model = linear_model(tmp_path / "linear.onnx")
    settings = load_settings({"MODEL_URI": str(model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1",
                              "MEMORY_LIMIT_BYTES": str(64 * GIB), "MEMORY_WAIT_SECONDS": "0.2"})
    app = create_app(settings)
    with TestClient(app) as client:
        wait_loaded(app)
        yield client, app.state.memory


def rows_body(rows: int) -> bytes:
    return json.dumps({"inputs": {"features": [[0.25, -1.5, 3.0, 0.125]] * rows}}).encode()


def test_health_shows_the_budget_measured_after_the_load(service):
    client, budget = service
    memory = client.get("/health").json()["memory"]
    assert memory["limit_bytes"] <= 64 * GIB and memory["budget_bytes"] == budget.total > 0
    assert memory["baseline_bytes"] > 0 and memory["decode_reserve_bytes"] > 0
    assert memory["in_use_bytes"] == 0 and memory["refused"] == 0


def test_a_body_that_never_fits_gets_413_and_one_that_finds_no_room_503_with_retry_after(service):
    client, budget = service
    body = rows_body(2000)
    budget.total = len(body)  # holds twice its body: never fits
    response = client.post("/predict", content=body)
    assert response.status_code == 413 and "fewer rows per request" in response.json()["detail"]

    budget.total = 4 * len(body)
    budget.in_use = 3 * len(body)  # other requests hold the rest
    response = client.post("/predict", content=body)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "memory" in response.json()["detail"] and "retry" in response.json()["detail"]
    v2 = client.post("/v2/models/linear/infer", content=json.dumps(
        {"inputs": [{"name": "features", "shape": [2000, 4], "datatype": "FP32", "data": [0.5] * 8000}]}))
    assert v2.status_code == 503 and "memory" in v2.json()["error"]

    budget.release(3 * len(body))
    response = client.post("/predict", content=body)
    assert response.status_code == 200 and len(response.json()["outputs"]["scores"]) == 2000
    memory = client.get("/health").json()["memory"]
    assert memory["in_use_bytes"] == 0 and memory["refused"] == 3 and memory["peak_in_use_bytes"] == 2 * len(body)


def test_a_chunked_body_is_admitted_by_the_bytes_read(service):
    client, budget = service
    body = rows_body(2000)
    budget.total = len(body)
    response = client.post("/predict", content=iter([body[:1000], body[1000:]]))  # no Content-Length
    assert response.status_code == 413
    budget.total = 10 * len(body)
    response = client.post("/predict", content=iter([body[:1000], body[1000:]]))
    assert response.status_code == 200


# --- every path gives back what it admitted (issue 22) -------------------------------------------------------


def admitted_then_given_back(budget: MemoryBudget) -> None:
    """The request was admitted (it held part of the budget), and holds none of it now."""
    assert budget.peak > 0, "the request was never admitted: this path proves nothing about giving back"
    assert budget.in_use == 0 and budget.as_json()["waiting"] == 0, budget.as_json()


@pytest.mark.parametrize("body, status", [
    (b'{"inputs": {"features": [[0.25, -1.5, 3.0, 0.125]]', 400),  # not JSON
    (b'{"rows": [[0.25, -1.5, 3.0, 0.125]]}', 422),  # JSON without "inputs"
    (b'{"inputs": {"features": [[0.25, -1.5, 3.0]]}}', 422),  # wrong shape
    (rows_body(3000).replace(b"3.0", b'"x"', 1), 422),  # a large body (decoded in the pool) with a string in it
])  # fmt: skip
def test_a_bad_request_gives_back_what_it_was_admitted_with(service, body, status):
    client, budget = service
    response = client.post("/predict", content=body)
    assert response.status_code == status, response.text
    admitted_then_given_back(budget)


def test_a_body_over_max_body_bytes_is_refused_before_admission_and_holds_nothing(tmp_path):
    model = linear_model(tmp_path / "linear.onnx")
    app = create_app(load_settings({"MODEL_URI": str(model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1",
                                    "MEMORY_LIMIT_BYTES": str(64 * GIB), "MAX_BODY_BYTES": "4096"}))
    with TestClient(app) as client:
        assert app.state.store.loaded.wait(30)
        budget = app.state.memory
        assert client.post("/predict", content=rows_body(200)).status_code == 413
        assert client.post("/predict", content=iter([rows_body(200)])).status_code == 413  # chunked: counted as read
        assert budget.in_use == 0 and budget.peak == 0
        assert client.post("/predict", content=rows_body(2)).status_code == 200
        admitted_then_given_back(budget)


@pytest.mark.parametrize("rows", [1, 3000])  # run on the event loop (batched) / decoded and run in the pool
def test_a_model_that_rejects_the_input_gives_back_what_it_was_admitted_with(tmp_path, rows):
    model = lookup_model(tmp_path / "lookup.onnx")
    app = create_app(load_settings({"MODEL_URI": str(model), "EXIT_ON_LOAD_FAILURE_AFTER": "-1",
                                    "MEMORY_LIMIT_BYTES": str(64 * GIB)}))
    with TestClient(app) as client:
        assert app.state.store.loaded.wait(30)
        budget = app.state.memory
        response = client.post("/predict", json={"inputs": {"ids": [[3]] * (rows - 1) + [[99]]}})  # 99: no such row
        assert response.status_code == 422 and "rejected" in response.json()["detail"], response.text
        admitted_then_given_back(budget)
        assert client.post("/predict", json={"inputs": {"ids": [[3]] * rows}}).status_code == 200


def call(app, body_messages: list[dict], path: str = "/predict", length: int | None = None):
    """Drive the ASGI app with one request whose body arrives as `body_messages`; the answer's messages, and a
    future the request's task, for tests that cancel it."""
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "scheme": "http"}  # fmt: skip
    messages = iter(body_messages)
    sent: list[dict] = []

    async def receive():
        try:
            return next(messages)
        except StopIteration:
            await asyncio.Event().wait()  # the client sends nothing more

    async def send(message):
        sent.append(message)

    return sent, app(scope, receive, send)


def test_a_client_gone_mid_body_gives_back_what_it_was_admitted_with(service):
    client, budget = service
    body = rows_body(2000)
    sent, request = call(client.app, [{"type": "http.request", "body": body[:1000], "more_body": True},
                                      {"type": "http.disconnect"}], length=len(body))
    asyncio.run(request)
    assert sent == []  # no one to answer
    admitted_then_given_back(budget)


def test_a_request_cancelled_while_it_waits_for_room_gives_back_nothing_it_never_held(service):
    client, budget = service
    body = rows_body(2000)

    async def scenario():
        budget.total = 4 * len(body)
        budget.in_use = others = 3 * len(body)  # other requests hold the rest
        sent, request = call(client.app, [{"type": "http.request", "body": body}], length=len(body))
        task = asyncio.ensure_future(request)
        while not budget.waiters:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.as_json()["waiting"] == 0
        budget.release(others)  # room again: the cancelled request must not take it
        assert budget.in_use == 0, budget.as_json()

    asyncio.run(scenario())


def test_a_request_cancelled_just_as_it_is_granted_room_gives_it_back(service):
    client, budget = service
    body = rows_body(2000)

    async def scenario():
        budget.total = 4 * len(body)
        budget.in_use = others = 3 * len(body)
        sent, request = call(client.app, [{"type": "http.request", "body": body}], length=len(body))
        task = asyncio.ensure_future(request)
        while not budget.waiters:
            await asyncio.sleep(0.001)
        budget.release(others)  # grants the waiting request its room (in_use = its cost) ...
        assert budget.in_use == 2 * len(body)
        task.cancel()  # ... and it is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.in_use == 0 and budget.as_json()["waiting"] == 0, budget.as_json()

    asyncio.run(scenario())
    assert client.post("/predict", content=body).status_code == 200
    admitted_then_given_back(budget)
