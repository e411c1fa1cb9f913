"""fanout.kube.Informer against the loopback API server (tests/kube_server.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

kubernetes = pytest.importorskip("kubernetes", reason="pip install 'fanout-informer[kube]'")

from helpers import FakeClock, Noop, Recorder, wait_calls, wait_for  # noqa: E402
from kube_server import KubeServer  # noqa: E402

import fanout  # noqa: E402
from fanout.kube import ApiError, Informer, Store  # noqa: E402
from fanout.kube._client import Request, close_api_client  # noqa: E402

FAST = {"min_backoff": 0.01, "max_backoff": 0.05}


@pytest.fixture
def kube(no_leaks):
    server = KubeServer()
    yield server
    server.close()


@pytest.fixture
def api(kube):
    client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=kube.url))
    yield client
    close_api_client(client)


@pytest.fixture
def informers():
    """Informers stopped after the test, before the server and the client go."""
    made: list[Informer] = []
    yield made.append
    for inf in made:
        assert inf.stop(timeout=10), f"{inf!r} did not stop"


class Log(fanout.Handler):
    """A thread-listener handler keeping (kind, name, detail) per call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, Any]] = []

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self._put(("add", _name(obj), is_in_initial_list))

    def on_update(self, old: Any, new: Any) -> None:
        self._put(("update", _name(new), (_spec(old), _spec(new))))

    def on_delete(self, obj: Any) -> None:
        self._put(("delete", _name(obj), _spec(obj)))

    def _put(self, call: tuple[str, str, Any]) -> None:
        with self.lock:
            self.calls.append(call)

    def snapshot(self) -> list[tuple[str, str, Any]]:
        with self.lock:
            return list(self.calls)

    def wait(self, count: int, timeout: float = 30.0) -> list[tuple[str, str, Any]]:
        assert wait_for(lambda: len(self.calls) >= count, timeout), (
            f"wanted {count} calls, got {self.snapshot()}"
        )
        return self.snapshot()


def _name(obj: Any) -> str:
    return obj["metadata"]["name"]


def _spec(obj: Any) -> Any:
    return obj.get("spec")


def _setup(make_dist, api, informers, resource="pods", **kwargs):
    d = make_dist()
    log = Log()
    reg = d.add_listener(log, executor="thread")
    d.start()
    opts = {**FAST, **kwargs}
    inf = Informer(d, resource, api_client=api, **opts)
    informers(inf)
    return d, reg, log, inf


@pytest.mark.parametrize("streaming", [False, True], ids=["paged", "streaming"])
def test_list_then_watch_delivers_every_change_in_order(
    kube, api, informers, make_dist, streaming
):
    for name in "abcde":
        kube.create("pods", name, spec={"v": 0})
    _, reg, log, inf = _setup(make_dist, api, informers, page_size=2, streaming=streaming)
    inf.start()
    assert inf.wait_synced(10)
    assert reg.wait_synced(10)
    calls = log.wait(5)
    assert sorted(calls) == [("add", n, True) for n in "abcde"]
    assert sorted(inf.store.keys()) == [f"default/{n}" for n in "abcde"]
    # Items of a list carry no kind; the informer fills it in, as watch events have it.
    assert inf.store.get("default/a")["kind"] == "Pod"
    if streaming:
        assert kube.lists() == []
        assert kube.watches()[0]["sendInitialEvents"] == "true"
    else:
        pages = kube.lists()
        assert [p.get("limit") for p in pages] == ["2", "2", "2"]
        assert "continue" not in pages[0] and all("continue" in p for p in pages[1:])
    kube.create("pods", "f", spec={"v": 0})
    kube.update("pods", "a", spec={"v": 1})
    kube.delete("pods", "b")
    calls = log.wait(8)[5:]
    assert calls == [
        ("add", "f", False),
        ("update", "a", ({"v": 0}, {"v": 1})),
        ("delete", "b", {"v": 0}),
    ]
    assert "default/b" not in inf.store
    assert inf.store.get("default/a")["spec"] == {"v": 1}
    stats = inf.stats()
    assert (stats.synced, stats.lists, stats.events, stats.store_size) == (True, 1, 3, 5)
    assert stats.resource_version == str(kube.rv)


def test_watch_starts_from_the_list_version(kube, api, informers, make_dist):
    kube.create("pods", "a")
    inf = _setup(make_dist, api, informers, streaming=False)[3]
    inf.start()
    assert inf.wait_synced(10)
    assert wait_for(lambda: kube.watches(), 10)
    watch = kube.watches()[0]
    assert watch["resourceVersion"] == str(kube.rv)
    assert watch["allowWatchBookmarks"] == "true"
    assert watch["watch"] == "true"


def test_streaming_list_falls_back_to_list_and_watch_for_good(kube, api, informers, make_dist):
    kube.streaming = False
    for name in "ab":
        kube.create("pods", name)
    _, _, log, inf = _setup(make_dist, api, informers)
    inf.start()
    assert inf.wait_synced(10)
    assert sorted(log.wait(2)) == [("add", "a", True), ("add", "b", True)]
    # Refused once (422), then paged lists, and a relist does not ask again.
    kube.answer_gone(1)
    kube.drop_watches()
    assert wait_for(lambda: inf.stats().relists == 1 and len(kube.lists()) == 2, 10)
    streaming = [w for w in kube.watches() if w.get("sendInitialEvents")]
    assert len(streaming) == 1
    # The refusal is no error; the one counted is the dropped watch.
    assert inf.stats().errors <= 1


def test_a_dropped_watch_resumes_from_the_last_version_without_repeats(
    kube, api, informers, make_dist
):
    kube.create("pods", "a", spec={"v": 0})
    _, _, log, inf = _setup(make_dist, api, informers)
    inf.start()
    assert inf.wait_synced(10)
    kube.update("pods", "a", spec={"v": 1})
    log.wait(2)
    seen = inf.stats().resource_version
    kube.set_silent(True)  # the next changes happen while no watch can carry them
    kube.drop_watches()
    kube.update("pods", "a", spec={"v": 2})
    kube.create("pods", "b")
    kube.set_silent(False)
    calls = log.wait(4)
    assert calls[1:] == [
        ("update", "a", ({"v": 0}, {"v": 1})),
        ("update", "a", ({"v": 1}, {"v": 2})),
        ("add", "b", False),
    ]
    resumed = [w["resourceVersion"] for w in kube.watches() if "resourceVersion" in w]
    assert seen in resumed, kube.requests
    stats = inf.stats()
    assert stats.relists == 0 and stats.gone == 0 and stats.watch_restarts >= 1


def test_bookmarks_move_the_resume_version(kube, api, informers, make_dist):
    kube.create("pods", "a", namespace="watched")
    d = make_dist()
    d.start()
    inf = Informer(d, "pods", api_client=api, namespace="watched", **FAST)
    informers(inf)
    inf.start()
    assert inf.wait_synced(10)
    # Changes elsewhere move the server's version; only a bookmark tells this watch.
    for i in range(5):
        kube.create("pods", f"other-{i}", namespace="elsewhere")
    kube.send_bookmarks()
    assert wait_for(lambda: inf.stats().resource_version == str(kube.rv), 10)
    assert inf.stats().bookmarks >= 1
    kube.drop_watches()
    assert wait_for(lambda: kube.watches()[-1].get("resourceVersion") == str(kube.rv), 10)
    assert inf.stats().events == 0 and len(inf.store) == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["paged", "streaming"])
def test_410_relist_reconciles_against_the_store(kube, api, informers, make_dist, streaming):
    for name in "abc":
        kube.create("pods", name, spec={"v": 0})
    _, _, log, inf = _setup(make_dist, api, informers, streaming=streaming)
    inf.start()
    assert inf.wait_synced(10)
    log.wait(3)
    kube.set_silent(True)
    kube.delete("pods", "a")
    kube.update("pods", "b", spec={"v": 1})
    kube.create("pods", "d", spec={"v": 0})
    kube.compact()  # the watch's version is gone now
    kube.drop_watches()
    kube.set_silent(False)
    calls = log.wait(6)
    assert sorted(calls[3:]) == [
        ("add", "d", False),
        ("delete", "a", {"v": 0}),  # the last state the informer knew
        ("update", "b", ({"v": 0}, {"v": 1})),
    ]
    assert wait_for(lambda: inf.stats().relists == 1)
    stats = inf.stats()
    assert stats.gone == 1 and stats.relists == 1
    assert sorted(inf.store.keys()) == ["default/b", "default/c", "default/d"]
    # Nothing that did not change was delivered again; the new watch is live.
    kube.update("pods", "c", spec={"v": 1})
    assert log.wait(7)[6] == ("update", "c", ({"v": 0}, {"v": 1}))


def test_410_storm_delivers_each_change_once(kube, api, informers, make_dist):
    for name in "abc":
        kube.create("pods", name, spec={"v": 0})
    _, _, log, inf = _setup(make_dist, api, informers)
    inf.start()
    assert inf.wait_synced(10)
    log.wait(3)
    kube.answer_gone(25)
    kube.drop_watches()
    for v in range(1, 6):
        kube.update("pods", "a", spec={"v": v})
    kube.delete("pods", "c")
    assert wait_for(lambda: kube.gone_watches == 0 and inf.stats().gone >= 25, 30)
    kube.create("pods", "z")
    calls = log.wait(3 + 2)
    assert wait_for(lambda: ("add", "z", False) in log.snapshot(), 10)
    calls = log.snapshot()[3:]
    # However the updates to a were split between watches and relists, they came
    # in order, ending at v=5, and c's deletion and b (unchanged) only as due.
    a_updates = [c[2] for c in calls if c[1] == "a"]
    assert a_updates[-1][1] == {"v": 5}
    assert all(old["v"] < new["v"] for old, new in a_updates)
    assert [c[1] for c in calls].count("c") == 1 and ("b" not in [c[1] for c in calls])
    assert sorted(inf.store.keys()) == ["default/a", "default/b", "default/z"]
    assert inf.stats().relists >= 25


def test_a_silent_watch_is_restarted(kube, api, informers, make_dist):
    _, _, log, inf = _setup(make_dist, api, informers, silence_timeout=0.3)
    inf.start()
    assert inf.wait_synced(10)
    kube.set_silent(True)
    assert wait_for(lambda: inf.stats().silent_watches >= 2, 20)
    kube.set_silent(False)
    kube.create("pods", "late")
    assert log.wait(1) == [("add", "late", False)]


def test_server_timeout_ends_a_watch_and_it_resumes(kube, api, informers, make_dist):
    _, _, log, inf = _setup(make_dist, api, informers, watch_timeout=1, streaming=False)
    inf.start()
    assert inf.wait_synced(10)
    assert wait_for(lambda: len(kube.watches()) >= 3, 20)
    assert {w["timeoutSeconds"] for w in kube.watches()} == {"1"}
    kube.create("pods", "a")
    assert log.wait(1) == [("add", "a", False)]
    stats = inf.stats()
    assert stats.errors == 0 and stats.relists == 0 and stats.watch_restarts >= 2


def test_expired_continue_token_means_listing_again(kube, api, informers, make_dist):
    for i in range(7):
        kube.create("pods", f"p{i}")
    kube.expire_continue_tokens(next_requests=1)
    _, _, log, inf = _setup(make_dist, api, informers, page_size=3, streaming=False)
    inf.start()
    assert inf.wait_synced(10)
    calls = log.wait(7)
    # Page one was applied before the token expired; the second list did not repeat it.
    assert sorted(calls) == [("add", f"p{i}", True) for i in range(7)]
    stats = inf.stats()
    assert (stats.gone, stats.list_restarts, stats.lists) == (1, 1, 1)
    assert [p.get("continue", "") != "" for p in kube.lists()] == [False, True, False, True, True]


def test_stop_mid_list_ends_at_once_and_marks_nothing_synced(kube, api, informers, make_dist):
    kube.create_many("pods", 50)
    kube.stall_lists.set()
    _, reg, _, inf = _setup(make_dist, api, informers, page_size=10, streaming=False)
    inf.start()
    assert kube.list_stalled.wait(10)
    assert inf.stop(timeout=5)
    assert not inf.has_synced() and not reg.has_synced()
    assert not inf.wait_synced(0.1)
    kube.stall_lists.clear()


def test_stop_during_a_watch_is_prompt_and_idempotent(kube, api, informers, make_dist):
    _, _, _, inf = _setup(make_dist, api, informers)
    inf.start()
    assert inf.wait_synced(10)
    assert wait_for(lambda: kube.watches(), 10)
    assert inf.stop(timeout=5)
    assert inf.stop(timeout=5)
    with pytest.raises(RuntimeError, match="once"):
        inf.start()


def test_cluster_scoped_and_custom_resources(kube, api, informers, make_dist):
    kube.create("namespaces", "prod", namespace=None)
    kube.create("widgets", "w1", namespace="team-a")
    d = make_dist()
    d.start()
    ns = Informer(d, "namespaces", api_client=api, **FAST)
    widgets = Informer(
        d, "widgets", api_client=api, group="example.com", namespace="team-a", **FAST
    )
    for inf in (ns, widgets):
        informers(inf)
        inf.start()
        assert inf.wait_synced(10)
    assert ns.store.keys() == ["prod"]
    assert ns.store.by_index("namespace", "") == [ns.store.get("prod")]
    assert widgets.store.keys() == ["team-a/w1"]
    assert widgets.store.get("team-a/w1")["kind"] == "Widget"
    paths = {p for verb, p, _ in kube.requests}
    assert paths == {"namespaces", "widgets"}


@pytest.mark.parametrize("streaming", [False, True], ids=["paged", "streaming"])
def test_label_selector_objects_leaving_it_are_deleted(kube, api, informers, make_dist, streaming):
    kube.create("pods", "web", labels={"app": "web"})
    kube.create("pods", "db", labels={"app": "db"})
    _, _, log, inf = _setup(
        make_dist, api, informers, label_selector="app=web", streaming=streaming
    )
    inf.start()
    assert inf.wait_synced(10)
    assert log.wait(1) == [("add", "web", True)]
    kube.update("pods", "web", labels={"app": "other"})
    kube.update("pods", "db", labels={"app": "web"})
    assert log.wait(3)[1:] == [("delete", "web", {}), ("add", "db", False)]
    assert inf.store.keys() == ["default/db"]
    for q in kube.requests:
        assert q[2]["labelSelector"] == "app=web"


def test_field_selector_is_passed(kube, api, informers, make_dist):
    kube.create("pods", "one")
    kube.create("pods", "two")
    _, _, log, inf = _setup(make_dist, api, informers, field_selector="metadata.name=two")
    inf.start()
    assert inf.wait_synced(10)
    assert log.wait(1) == [("add", "two", True)]


def test_transform_runs_before_store_and_distributor(kube, api, informers, make_dist):
    kube.create("pods", "a", spec={"big": "x" * 1000, "keep": 1})

    def slim(obj: Any) -> Any:
        return {"metadata": obj["metadata"], "spec": {"keep": obj["spec"]["keep"]}}

    _, _, log, inf = _setup(make_dist, api, informers, transform=slim)
    inf.start()
    assert inf.wait_synced(10)
    log.wait(1)
    assert inf.store.get("default/a")["spec"] == {"keep": 1}
    kube.update("pods", "a", spec={"big": "y", "keep": 2})
    kube.delete("pods", "a")
    assert log.wait(3)[1:] == [
        ("update", "a", ({"keep": 1}, {"keep": 2})),
        ("delete", "a", {"keep": 2}),
    ]


def test_a_raising_transform_ends_the_informer_with_its_error(kube, api, informers, make_dist):
    kube.create("pods", "a")

    def broken(obj: Any) -> Any:
        raise KeyError("nope")

    _, _, _, inf = _setup(make_dist, api, informers, transform=broken)
    inf.start()
    assert not inf.wait_synced(10)
    assert isinstance(inf.error, KeyError)
    assert "transform raised KeyError" in inf.stats().last_error


def test_informer_ends_when_the_distributor_stops(kube, api, informers, make_dist):
    d, _, _, inf = _setup(make_dist, api, informers)
    inf.start()
    assert inf.wait_synced(10)
    d.stop()
    kube.create("pods", "a")
    assert wait_for(lambda: isinstance(inf.error, fanout.DistributorStopped), 10)


def test_an_informer_given_no_distributor_makes_starts_and_stops_one(kube, api):
    kube.create("pods", "a")
    inf = Informer(None, "pods", api_client=api, **FAST)
    d = inf.distributor
    assert isinstance(d, fanout.Distributor) and not d.started
    log = Log()
    reg = d.add_listener(log, executor="thread")
    with inf:  # start() starts the distributor it made
        assert d.started
        assert inf.wait_synced(10) and reg.wait_synced(10)
        kube.create("pods", "b")
        assert log.wait(2) == [("add", "a", True), ("add", "b", False)]
    assert d.stopped  # stop() stopped it, draining
    s = reg.stats()
    assert (s.received, s.delivered) == (2, 2)


def test_an_informer_never_stops_a_distributor_it_was_given(kube, api, informers, make_dist):
    d, _, _, inf = _setup(make_dist, api, informers)
    assert inf.distributor is d
    inf.start()
    assert inf.wait_synced(10)
    assert inf.stop(timeout=10)
    assert d.started and not d.stopped


def test_store_indexers(kube, api, informers, make_dist):
    kube.create("pods", "a", namespace="n1", spec={"node": "x"})
    kube.create("pods", "b", namespace="n2", spec={"node": "x"})
    kube.create("pods", "c", namespace="n2", spec={"node": "y"})
    d = make_dist()
    d.start()
    inf = Informer(
        d, "pods", api_client=api, indexers={"node": lambda o: [o["spec"]["node"]]}, **FAST
    )
    informers(inf)
    inf.start()
    assert inf.wait_synced(10)
    assert sorted(_name(o) for o in inf.store.by_index("node", "x")) == ["a", "b"]
    assert sorted(inf.store.index_keys("namespace", "n2")) == ["n2/b", "n2/c"]
    kube.update("pods", "a", namespace="n1", spec={"node": "y"})
    assert wait_for(lambda: sorted(inf.store.index_keys("node", "y")) == ["n1/a", "n2/c"], 10)
    kube.delete("pods", "c", namespace="n2")
    assert wait_for(lambda: inf.store.index_keys("node", "y") == ["n1/a"], 10)
    assert inf.store.by_index("namespace", "n9") == []
    with pytest.raises(KeyError, match="no index named 'zone'"):
        inf.store.by_index("zone", "a")


def test_store_refuses_bad_indexers():
    with pytest.raises(ValueError, match="built in"):
        Store({"namespace": lambda o: []})
    with pytest.raises(TypeError, match="must be a function"):
        Store({"x": 3})  # type: ignore[dict-item]
    store = Store({"bad": lambda o: "abc"})
    with pytest.raises(TypeError, match="iterable of strings"):
        store._put("ns/a", {}, "1")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"resource": ""}, ValueError, "resource"),
        ({"resource": "pods/log"}, ValueError, "resource"),
        ({"namespace": ""}, ValueError, "namespace"),
        ({"page_size": 0}, ValueError, "page_size"),
        ({"watch_timeout": 0}, ValueError, "watch_timeout"),
        ({"silence_timeout": -1}, ValueError, "silence_timeout"),
        ({"transform": 3}, TypeError, "transform"),
        ({"api_client": "http://x"}, TypeError, "ApiClient"),
        ({"label_selector": ["a"]}, TypeError, "label_selector"),
        ({"min_backoff": 2, "max_backoff": 1}, ValueError, "max_backoff"),
    ],
)
def test_bad_arguments_are_refused_at_construction(make_dist, kwargs, error, match):
    d = make_dist()
    args = {"resource": "pods", "api_client": None, **kwargs}
    with pytest.raises(error, match=match):
        Informer(d, **args)


def test_distributor_must_be_a_distributor():
    with pytest.raises(TypeError, match=r"fanout\.Distributor"):
        Informer(object(), "pods")  # type: ignore[arg-type]


def with_v(obj: Any) -> Any:
    """A transform giving helpers.Recorder its version field (module level: it pickles)."""
    return {"metadata": obj["metadata"], "v": obj["spec"].get("v", 0)}


def test_per_key_order_through_process_workers(kube, api, informers, make_dist, tmp_path):
    names = [f"k{i}" for i in range(12)]
    for name in names:
        kube.create("pods", name, spec={"v": 0})
    d = make_dist()
    path = tmp_path / "calls"
    reg = d.add_listener(Recorder(path), workers=3)
    d.start()
    inf = Informer(d, "pods", api_client=api, transform=with_v, **FAST)
    informers(inf)
    inf.start()
    assert inf.wait_synced(10)
    for v in range(1, 8):
        for name in names:
            kube.update("pods", name, spec={"v": v})
        if v == 4:
            kube.drop_watches()  # a resume in the middle changes nothing
    calls = wait_calls(path, len(names) * 8)
    by_name: dict[str, list[tuple[str, int]]] = {}
    for c in calls:
        by_name.setdefault(c.name, []).append((c.kind, c.v))
    for name in names:
        assert by_name[name] == [("add", 0)] + [("update", v) for v in range(1, 8)]
    # Each key stayed on one worker.
    for name in names:
        assert len({c.pid for c in calls if c.name == name}) == 1
    assert reg.wait_synced(10)


class Count(fanout.Handler):
    def __init__(self) -> None:
        self.n = 0
        self.initial = 0

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self.n += 1
        self.initial += is_in_initial_list


def slim(obj: Any) -> Any:
    meta = obj["metadata"]
    return {
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "i": obj["spec"]["i"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["paged", "streaming"])
def test_100k_objects_with_a_transform(kube, api, informers, make_dist, streaming):
    count = 100_000
    kube.create_many("pods", count)
    d = make_dist()
    counter = Count()
    reg = d.add_listener(counter, executor="thread")
    d.start()
    inf = Informer(d, "pods", api_client=api, transform=slim, streaming=streaming, **FAST)
    informers(inf)
    inf.start()
    assert inf.wait_synced(60)
    assert reg.wait_synced(60)
    assert (counter.n, counter.initial) == (count, count)
    assert len(inf.store) == count
    assert inf.store.get("default/obj-99999") == slim(
        {"metadata": {"name": "obj-99999", "namespace": "default"}, "spec": {"i": 99999}}
    )
    assert len(inf.store.by_index("namespace", "default")) == count
    if not streaming:
        assert len(kube.lists()) == count // 500


def test_a_watch_error_event_other_than_410_resumes_the_watch(kube, api, informers, make_dist):
    kube.create("pods", "a")
    _, _, log, inf = _setup(make_dist, api, informers)
    inf.start()
    assert inf.wait_synced(10)
    kube.fail_watches(1, 500)
    kube.drop_watches()  # the streaming list's watch is open: this is one error
    assert wait_for(lambda: "500 Injected" in inf.stats().last_error, 10), (
        inf.stats(),
        kube.requests,
    )
    kube.create("pods", "b")
    assert log.wait(2)[1] == ("add", "b", False)
    stats = inf.stats()
    assert (stats.errors, stats.relists) == (2, 0)


def test_failed_requests_are_retried_with_their_error_kept(kube, api, informers, make_dist):
    kube.create("pods", "a")
    kube.fail_lists(3, 403)
    _, _, log, inf = _setup(make_dist, api, informers, streaming=False)
    inf.start()
    assert inf.wait_synced(10)
    assert log.wait(1) == [("add", "a", True)]
    stats = inf.stats()
    assert stats.errors == 3 and stats.list_restarts == 3
    assert "403" in stats.last_error


def test_a_wrong_path_is_retried_and_never_synced(kube, api, informers, make_dist):
    d = make_dist()
    inf = Informer(d, "gizmos", api_client=api, **FAST)
    informers(inf)
    inf.start()
    assert not inf.wait_synced(0.5)
    assert wait_for(lambda: inf.stats().errors >= 2, 10)
    assert "404" in inf.stats().last_error


def test_server_answers_410_to_a_list_at_a_compacted_version(kube, api):
    kube.create("pods", "a")
    old = kube.rv
    kube.create("pods", "b")
    kube.compact()
    with pytest.raises(ApiError) as info:
        Request(api, "/api/v1/pods", [("resourceVersion", str(old)), ("limit", 10)], None)
    assert info.value.code == 410
    doc = Request(api, "/api/v1/pods", [("resourceVersion", "0")], None).read_json()
    assert [i["metadata"]["name"] for i in doc["items"]] == ["a", "b"]


def test_prometheus_collector_reads_the_informer_stats(kube, api, informers, make_dist):
    from prometheus_client.parser import text_string_to_metric_families

    from fanout.kube.metrics import COUNTERS, InformerCollector
    from fanout.metrics import serve

    kube.create("pods", "a")
    d = make_dist()
    d.start()
    pods = Informer(d, "pods", api_client=api, **FAST)
    prod = Informer(d, "pods", api_client=api, namespace="prod", **FAST)
    also = Informer(d, "pods", api_client=api, label_selector="x=y", **FAST)
    for inf in (pods, prod, also):
        informers(inf)
        inf.start()
        assert inf.wait_synced(10)
    kube.create("pods", "b")
    assert wait_for(lambda: pods.stats().events == 1, 10)
    with serve(d, 0) as server:
        server.registry.register(InformerCollector(pods, prod, also))
        import urllib.request

        with urllib.request.urlopen(server.url, timeout=10) as response:
            text = response.read().decode()
    figures: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "informer" in s.labels:
                figures.setdefault(s.labels["informer"], {})[s.name] = s.value
    assert set(figures) == {"/api/v1/pods", "/api/v1/namespaces/prod/pods", "/api/v1/pods#2"}
    got = figures["/api/v1/pods"]
    stats = pods.stats()
    for name, _, field in COUNTERS:
        assert got[f"{name}_total"] == getattr(stats, field), name
    assert got["fanout_kube_store_objects"] == 2
    assert got["fanout_kube_synced"] == 1
    assert 0 <= got["fanout_kube_resource_version_age_seconds"] < 60
    with pytest.raises(TypeError, match="Informer objects"):
        InformerCollector(d)  # type: ignore[arg-type]


def test_resync_sends_the_store_to_due_listeners_only(kube, api, informers, make_dist):
    kube.create("pods", "a", spec={"v": 0})
    kube.create("pods", "b", spec={"v": 0})
    clock = FakeClock()
    d = make_dist(resync_check_period=1.0, clock=clock)
    due, never = Log(), Log()
    d.add_listener(due, executor="thread", resync_period=5.0)
    d.add_listener(never, executor="thread", resync_period=0)
    d.start()
    inf = Informer(d, "pods", api_client=api, **FAST)
    informers(inf)
    inf.start()
    assert inf.wait_synced(10)
    assert len(due.wait(2)) == 2
    clock.now += 5.0
    calls = due.wait(4)
    assert sorted(calls[2:]) == [
        ("update", "a", ({"v": 0}, {"v": 0})),
        ("update", "b", ({"v": 0}, {"v": 0})),
    ]
    assert inf.stats().resyncs == 1
    # A live change after the resync reaches both, newer than what the resync sent.
    kube.update("pods", "a", spec={"v": 1})
    assert due.wait(5)[4] == ("update", "a", ({"v": 0}, {"v": 1}))
    assert never.wait(3)[2] == ("update", "a", ({"v": 0}, {"v": 1}))


def test_fanout_top_shows_the_informers(kube, api, informers, make_dist):
    import io

    from fanout.kube.metrics import InformerCollector
    from fanout.metrics import serve
    from fanout.tools import top

    kube.create("pods", "a")
    d = make_dist()
    d.add_listener(Log(), executor="thread", name="printer")
    d.start()
    inf = Informer(d, "pods", api_client=api, **FAST)
    informers(inf)
    inf.start()
    assert inf.wait_synced(10)
    with serve(d, 0) as server:
        server.registry.register(InformerCollector(inf))
        before = top.scrape(server.url)
        kube.create("pods", "b")
        kube.create("pods", "c")
        assert wait_for(lambda: inf.stats().events == 2, 10)
        now = top.scrape(server.url)
        out = io.StringIO()
        assert top.once(server.url, 0.05, out) == 0
    (row,) = top.informer_rows(before, now)
    assert row.informer == "/api/v1/pods"
    assert row.events_rate is not None and row.events_rate > 0
    assert (row.figures.store, row.figures.synced, row.figures.errors) == (3, 1, 0)
    text = out.getvalue()
    assert "printer" in text
    header, line = text.splitlines()[-2:]
    assert header.split()[:3] == ["informer", "events/s", "store"]
    assert line.split()[0] == "/api/v1/pods" and line.split()[2] == "3"
    # The live view draws the same rows below the listeners' table.
    from rich.console import Console

    screen = io.StringIO()
    Console(file=screen, width=200).print(top._view(server.url, before, now, "status"))
    assert "informers" in screen.getvalue() and "/api/v1/pods" in screen.getvalue()


@pytest.mark.parametrize(
    "line",
    [
        b"{not json",
        b"[1, 2]",
        b'{"type": "BOOKMARK", "object": {"metadata": "x"}}',
        b'{"type": "WHATEVER", "object": {"metadata": {"name": "a"}}}',
        b'{"type": "ADDED", "object": {"metadata": {}}}',
    ],
    ids=["not-json", "not-an-event", "bad-bookmark", "unknown-type", "no-name"],
)
def test_a_garbled_watch_line_restarts_the_watch_from_the_last_version(
    kube, api, informers, make_dist, line
):
    kube.create("pods", "a")
    kube.garble_watches(1, line)  # the first watch after the list
    _, _, log, inf = _setup(make_dist, api, informers, streaming=False)
    inf.start()
    assert inf.wait_synced(10)
    assert wait_for(lambda: inf.stats().errors == 1 and len(kube.watches()) == 2, 10)
    assert kube.watches()[1]["resourceVersion"] == kube.watches()[0]["resourceVersion"]
    kube.create("pods", "b")
    assert log.wait(2) == [("add", "a", True), ("add", "b", False)]
    stats = inf.stats()
    assert stats.relists == 0 and inf.error is None


def test_stop_while_a_list_waits_for_its_answer_ends_within_the_read_timeout(
    kube, api, informers, make_dist
):
    kube.stall_list_headers.set()
    _, _, _, inf = _setup(make_dist, api, informers, streaming=False, silence_timeout=0.5)
    inf.start()
    assert wait_for(lambda: kube.lists(), 10)
    # Nothing can wake a request still waiting for the status line but its read
    # timeout, which is silence_timeout.
    assert inf.stop(timeout=10)
    assert not inf.has_synced()
    kube.stall_list_headers.clear()


class StopsTheInformer(fanout.Handler):
    """A careless handler: stops the informer that feeds it, from the listener's thread."""

    def __init__(self) -> None:
        self.informer: Informer | None = None
        self.stopped: list[bool] = []

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if self.informer is not None and not self.stopped:
            self.stopped.append(self.informer.stop(timeout=10))


def test_a_handler_may_stop_the_informer(kube, api, informers, make_dist):
    kube.create_many("pods", 200)
    d = make_dist()
    handler = StopsTheInformer()
    d.add_listener(handler, executor="thread")
    d.start()
    inf = Informer(d, "pods", api_client=api, page_size=10, **FAST)
    handler.informer = inf
    informers(inf)
    inf.start()
    assert wait_for(lambda: handler.stopped, 10)
    assert handler.stopped == [True]


def test_a_key_function_stopping_the_informer_ends_it_with_the_error(
    kube, api, informers, make_dist
):
    kube.create("pods", "a")
    d = make_dist()
    holder: list[Informer] = []

    def key(obj: Any) -> Any:
        holder[0].stop()  # runs on the informer's thread, inside distribute
        return "k"

    d.add_listener(Noop(), workers=2, key=key)  # keys route a process listener's lanes
    d.start()
    inf = Informer(d, "pods", api_client=api, **FAST)
    holder.append(inf)
    informers(inf)
    inf.start()
    assert wait_for(lambda: inf.error is not None, 10)
    assert isinstance(inf.error, RuntimeError) and "own thread" in str(inf.error)


def test_a_watch_left_behind_by_a_compaction_gets_410_and_relists(kube, api, informers, make_dist):
    kube.create("pods", "a")
    _, _, log, inf = _setup(make_dist, api, informers)
    inf.start()
    assert inf.wait_synced(10)
    kube.set_silent(True)  # the open watch falls behind...
    kube.create("pods", "b")
    kube.compact()  # ...and its position is compacted away
    kube.set_silent(False)
    assert log.wait(2)[1] == ("add", "b", False)
    stats = inf.stats()
    assert (stats.gone, stats.relists, stats.errors) == (1, 1, 0)
    assert len(kube.watches()) == 2  # the one that got 410, the streaming relist


def test_without_api_client_the_kubeconfig_is_used_and_its_client_closed(
    kube, informers, make_dist, tmp_path, monkeypatch
):
    from kubernetes.config import kube_config

    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: '{kube.url}'}}}}]\n"
        "users: [{name: u, user: {token: from-default-kubeconfig}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    before = config.read_text()
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    kube.create("pods", "a")
    d = make_dist()
    d.start()
    inf = Informer(d, "pods", **FAST)
    informers(inf)
    inf.start()
    assert inf.wait_synced(10)
    assert set(kube.authorizations) == {"Bearer from-default-kubeconfig"}
    assert inf.stop(timeout=10)
    assert config.read_text() == before  # the no-leak check sees its sockets closed


def test_without_any_configuration_start_says_what_to_do(make_dist, tmp_path, monkeypatch):
    from kubernetes.config import ConfigException, kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    inf = Informer(make_dist(), "pods")
    with pytest.raises(ConfigException, match="Pass api_client="):
        inf.start()
    assert inf.stop(timeout=1)
