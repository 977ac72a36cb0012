"""Who may do what: every client command against a real broker, as the
job's owner, another user, an admin and a peer with no login."""

from __future__ import annotations

import itertools

import pytest

from msp.broker import Broker
from msp.client import Client
from msp.errors import MspError

from .conftest import ADMIN_PASSWORD, broker_config

CALLERS = ("owner", "other", "admin", "none")
OK = "ok"

# command -> the outcome for owner, other user, admin, no login.
MATRIX = {
    "STATUS": (OK, "not_found", OK, "unauthenticated"),
    "WAIT": (OK, "not_found", OK, "unauthenticated"),
    "LIST": (OK, "forbidden", OK, "unauthenticated"),
    "CANCEL": (OK, "not_found", OK, "unauthenticated"),
    "LOGS": (OK, "not_found", OK, "unauthenticated"),
    "USER_ADD": ("forbidden", "forbidden", OK, "unauthenticated"),
    "USER_LIST": ("forbidden", "forbidden", OK, "unauthenticated"),
    "USER_DISABLE": ("forbidden", "forbidden", OK, "unauthenticated"),
    "USER_SET": ("forbidden", "forbidden", OK, "unauthenticated"),
    "PASSWD": ("forbidden", "forbidden", OK, "unauthenticated"),
    "WORKERS": ("forbidden", "forbidden", OK, "unauthenticated"),
    "STATS": (OK, OK, OK, "unauthenticated"),
    "BILLING": (OK, "forbidden", OK, "unauthenticated"),
    "AUDIT": ("forbidden", "forbidden", OK, "unauthenticated"),
}

_fresh = itertools.count(1)


class World:
    """One broker (no worker: jobs stay queued) and one client per
    caller."""

    def __init__(self, root):
        self.root = root
        cfg = broker_config(root, "tcp")
        self.broker = Broker(cfg, admin_password=ADMIN_PASSWORD).start()
        endpoint = self.broker.endpoints["client"]
        self.admin = Client(endpoint, timeout=5.0)
        self.admin.login("admin", ADMIN_PASSWORD)
        self.clients = {"admin": self.admin}
        for caller, name in (("owner", "alice"), ("other", "bob")):
            self.admin.user_add(name, f"{name}-password")
            c = Client(endpoint, timeout=5.0)
            c.login(name, f"{name}-password")
            self.clients[caller] = c
        self.clients["none"] = Client(endpoint, timeout=5.0,
                                      token="never-issued-token")
        self.script = root / "ok.py"
        self.script.write_text("print('hi')\n")
        (root / "data").mkdir()

    def job(self) -> int:
        n = next(_fresh)
        return self.clients["owner"].submit(
            self.script, self.root / "data", self.root / f"out{n}"
        )

    def target(self) -> str:
        """A fresh user for the user-management commands to act on."""
        name = f"target{next(_fresh)}"
        self.admin.user_add(name, "target-password")
        return name

    def close(self):
        for c in self.clients.values():
            c.close()
        self.broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("authz"))
    yield w
    w.close()


def body_for(command: str, world: World) -> tuple[dict, dict]:
    """The request body, and what the test needs to check afterwards."""
    if command in ("STATUS", "CANCEL", "LOGS"):
        job = world.job()
        return {"job": job}, {"job": job}
    if command == "WAIT":
        job = world.job()
        return {"job": job, "timeout": 0}, {"job": job}
    if command == "LIST":
        job = world.job()
        return {"user": "alice"}, {"job": job}
    if command == "USER_ADD":
        name = f"new{next(_fresh)}"
        return {"user": name, "password": "new-password"}, {"user": name}
    if command in ("USER_DISABLE", "PASSWD", "USER_SET"):
        name = world.target()
        body = {"user": name}
        if command == "PASSWD":
            body["password"] = "changed-password"
        if command == "USER_SET":
            body["credit_limit"] = 5.0
        return body, {"user": name}
    if command == "BILLING":
        return {"user": "alice"}, {}
    return {}, {}


def send(client: Client, command: str, body: dict):
    """The reply body, or the error code the broker answered with."""
    try:
        return client.request(command, {"token": client.token, **body})
    except MspError as exc:
        return exc.code


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("command", sorted(MATRIX))
def test_authorization_matrix(world, command, caller):
    expected = MATRIX[command][CALLERS.index(caller)]
    body, facts = body_for(command, world)
    admin = world.admin

    reply = send(world.clients[caller], command, body)

    if expected != OK:
        assert reply == expected
        # A refusal changes nothing.
        if "job" in facts:
            assert admin.status(facts["job"])["job"]["state"] == "queued"
        if "user" in facts:
            users = {u["user"]: u for u in admin.users()}
            if command == "USER_ADD":
                assert facts["user"] not in users
            else:
                target = users[facts["user"]]
                assert not target["disabled"]
                assert target["credit_limit"] is None
                probe = Client(world.broker.endpoints["client"], timeout=5.0)
                probe.login(facts["user"], "target-password")
                probe.close()
        return
    assert isinstance(reply, dict), reply
    if command in ("STATUS", "WAIT"):
        job = reply["job"]
        assert job["id"] == facts["job"] and job["state"] == "queued"
    elif command == "LIST":
        assert facts["job"] in [j["id"] for j in reply["jobs"]]
        assert {j["user"] for j in reply["jobs"]} == {"alice"}
    elif command == "CANCEL":
        assert reply == {"job": facts["job"], "state": "cancelled"}
        by_admin = admin.audit(event="cancel_by_admin")
        audited = [e for e in by_admin if e["detail"]["job"] == facts["job"]]
        assert len(audited) == (1 if caller == "admin" else 0)
    elif command == "LOGS":
        assert reply["state"] == "queued" and reply["data"] == ""
    elif command == "USER_ADD":
        assert facts["user"] in [u["user"] for u in admin.users()]
    elif command == "USER_LIST":
        assert {"admin", "alice", "bob"} <= {u["user"] for u in reply["users"]}
    elif command == "USER_DISABLE":
        users = {u["user"]: u for u in admin.users()}
        assert users[facts["user"]]["disabled"] is True
    elif command == "USER_SET":
        users = {u["user"]: u for u in admin.users()}
        assert users[facts["user"]]["credit_limit"] == 5.0
    elif command == "PASSWD":
        probe = Client(world.broker.endpoints["client"], timeout=5.0)
        assert probe.login(facts["user"], "changed-password")["user"] == \
            facts["user"]
        probe.close()
    elif command == "WORKERS":
        assert reply == {"workers": []}
    elif command == "STATS":
        # Counts are for everybody; the jobs listed are the caller's own
        # (bob has none), or everybody's for an admin.
        assert sum(reply["counts"].values()) >= 1
        recent = {j["id"] for j in reply["recent"]}
        if caller == "other":
            assert recent == set() and reply["admin"] is False
        else:
            assert {j["user"] for j in reply["recent"]} == {"alice"}
            assert reply["admin"] is (caller == "admin")
    elif command == "BILLING":
        assert reply["user"] == "alice" and reply["jobs"] == []
        assert reply["totals"]["cost"] == 0.0
    elif command == "AUDIT":
        events = {e["event"] for e in reply["entries"]}
        assert {"login", "user_add"} <= events


def test_a_user_changes_their_own_password(world):
    name = world.target()
    c = Client(world.broker.endpoints["client"], timeout=5.0)
    c.login(name, "target-password")
    c.passwd("brand-new-password")
    c.close()
    probe = Client(world.broker.endpoints["client"], timeout=5.0)
    with pytest.raises(MspError) as old:
        probe.login(name, "target-password")
    assert old.value.code == "unauthenticated"
    assert probe.login(name, "brand-new-password")["user"] == name
    probe.close()
    entries = world.admin.audit(event="passwd", actor=name)
    assert [e["detail"]["user"] for e in entries] == [name]


def test_a_request_without_a_token_is_refused(world):
    c = world.clients["none"]
    with pytest.raises(MspError) as caught:
        c.request("STATUS", {"job": 1})
    assert caught.value.code == "bad_request"
    assert "missing field 'token'" in caught.value.message


def test_list_without_a_user_shows_only_the_callers_jobs(world):
    job = world.job()
    mine = world.clients["owner"].jobs(limit=1000)
    theirs = world.clients["other"].jobs(limit=1000)
    assert job in [j["id"] for j in mine]
    assert {j["user"] for j in mine} == {"alice"}
    assert theirs == []


def test_an_admin_cannot_disable_themselves(world):
    with pytest.raises(MspError) as caught:
        world.admin.user_disable("admin")
    assert caught.value.code == "conflict"
    assert world.admin.users()[0]["disabled"] is False
