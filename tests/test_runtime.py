"""`make run` and what keeps it safe: supervised processes, probes that answer while the database
hangs, error pages without passwords, a Content-Security-Policy on every response."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from django.test import override_settings
from django.views.debug import technical_500_response

from bridge import runtime
from tests.conftest import ROOT, free_port

PYTHON = str(ROOT / ".venv/bin/python")
SECRET = "pw-s3cret-9f2c"
# Anything that would make a child process use the developer's services or settings.
_INHERITED = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "DEBUG",
    "BRIDGE_ENV",
    "BRIDGE_LOCAL_RUN",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "BRIDGE_ADMIN_PASSWORD",
    "BRIDGE_ADMIN_PASSWORD_FILE",
    "PORT",
)


def bridge_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a Bridge of its own: SQLite and the filesystem broker in `var_dir`."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    env["BRIDGE_VAR_DIR"] = str(var_dir)
    env.update(extra)
    return env


def processes_of(var_dir: Path) -> list[int]:
    """Every live process started for the Bridge of `var_dir` (its environment names it)."""
    marker = f"BRIDGE_VAR_DIR={var_dir}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie has finished; only its parent's wait is missing
                    found.append(int(entry.name))
        except OSError:
            continue  # ended meanwhile, or not ours to read
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def timed_get(url: str) -> tuple[float, int, bytes]:
    started = time.monotonic()
    status, _, body = get(url)
    return time.monotonic() - started, status, body


def wait_until_answering(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            get(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


class Output:
    """Collects a process's output lines in a thread; `wait_for` blocks until one matches."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, re.Match]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(start, len(self.lines)):
                    match = regex.search(self.lines[index])
                    if match:
                        return index, match
                start = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no line matching {pattern!r}; output ends:\n{tail}")
                self._changed.wait(remaining)

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)


def ctl(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(ROOT / "bin/run"), "ctl", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout.strip()


def prepare(env: dict[str, str]) -> None:
    """What `make setup` does before bin/run."""
    for command in (["migrate", "--noinput"], ["collectstatic", "--noinput", "-v0"]):
        subprocess.run(
            [PYTHON, "manage.py", *command], cwd=ROOT, env=env, check=True, capture_output=True
        )
    subprocess.run(
        [PYTHON, "manage.py", "ensure_admin"], cwd=ROOT, env=env, check=True, capture_output=True
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A var dir with a short path, so supervisord's socket stays inside it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="brt-") as folder:
        yield Path(folder) / "var"


# --- make run -----------------------------------------------------------------------------


@pytest.mark.servers
def test_make_run_supervises_web_worker_and_beat_restarts_a_killed_worker_and_stops_on_ctrl_c(
    short_tmp,
):
    # given a set-up Bridge of its own (SQLite, filesystem broker) with a generated password
    var_dir = short_tmp
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = bridge_env(var_dir, PORT=str(port))
    prepare(env)
    assert (var_dir / "admin_password").exists()

    # when it is started as `make run` starts it
    run = subprocess.Popen(
        [str(ROOT / "bin/run")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = Output(run.stdout)
    try:
        # then it says it is up once the web server answers, and the password follows
        up, _ = output.wait_for(r"^Bridge is up: http://127\.0\.0\.1:\d+/admin/", timeout=60)
        assert output.lines[up].startswith(f"Bridge is up: {base}/admin/")
        assert get(f"{base}/health/live")[0] == 200
        at, login = output.wait_for(r"^Admin login: admin / (\S+)$", timeout=5, start=up + 1)
        assert at == up + 1
        assert not (var_dir / "admin_password").exists()
        credentials = json.dumps({"username": "admin", "password": login.group(1)}).encode()
        request = urllib.request.Request(
            f"{base}/api/security/auth/login",
            data=credentials,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert "access" in json.load(response)

        # and it serves with DEBUG off: static files by WhiteNoise, no technical 404 page,
        # cookies usable over plain http, a Content-Security-Policy
        assert get(f"{base}/static/admin/css/base.css")[0] == 200
        status, _, body = get(f"{base}/no-such-page")
        assert status == 404 and b"URLconf" not in body
        status, headers, _ = get(f"{base}/admin/login/")
        assert status == 200
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "csrftoken=" in headers["Set-Cookie"] and "Secure" not in headers["Set-Cookie"]

        # and the three are supervised by supervisord (RUNNING once up for startsecs)
        deadline = time.monotonic() + 30
        while len(re.findall(r"^bridge:(web|worker|beat)\s+RUNNING", ctl(env, "status"), re.M)) < 3:
            assert time.monotonic() < deadline, ctl(env, "status")
            time.sleep(0.3)
        # and worker and beat report in
        while (ready := json.loads(get(f"{base}/health/ready")[2]))["status"] != "ok":
            assert time.monotonic() < deadline, ready
            time.sleep(0.5)

        # and a second run on the same var dir refuses to start, leaving the first alone
        second = subprocess.run(
            [str(ROOT / "bin/run")],
            cwd=ROOT,
            env={**env, "PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        assert "Bridge is up" not in second.stdout
        assert get(f"{base}/health/live")[0] == 200

        # when the worker is killed
        worker = int(ctl(env, "pid", "bridge:worker"))
        os.kill(worker, signal.SIGKILL)
        # then supervisord starts a new one while the web server keeps answering
        deadline = time.monotonic() + 20
        while True:
            assert get(f"{base}/health/live", timeout=2)[0] == 200
            line = ctl(env, "status", "bridge:worker")
            restarted = re.search(r"RUNNING\s+pid (\d+)", line)
            if restarted and int(restarted.group(1)) != worker:
                break
            assert time.monotonic() < deadline, line
            time.sleep(0.3)
        output.wait_for(r"exited: worker \(terminated by SIGKILL; not expected\)", timeout=5)
        assert worker not in processes_of(var_dir)

        # when Ctrl-C reaches bin/run
        stopping = time.monotonic()
        run.send_signal(signal.SIGINT)
        run.wait(timeout=20)
        # then every process of the run is gone within seconds
        assert time.monotonic() - stopping < 15
        assert processes_of(var_dir) == []
        # and the log shows requests, but not the static files a page pulls in
        log = output.text()
        assert '"GET /health/live HTTP/1.1" 200' in log
        assert "/static/admin/css/base.css" not in log
        assert SECRET not in log
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        kill_all(processes_of(var_dir))


def test_two_instances_get_their_own_supervisor_socket_pid_file_and_logs(tmp_path):
    first = runtime.supervisor_paths(tmp_path / "one" / "var")
    second = runtime.supervisor_paths(tmp_path / "two" / "var")
    for name in ("BRIDGE_SUPERVISOR_SOCKET", "BRIDGE_SUPERVISOR_PIDFILE", "BRIDGE_SUPERVISOR_DIR"):
        assert first[name] != second[name]
    for paths, home in ((first, tmp_path / "one" / "var"), (second, tmp_path / "two" / "var")):
        assert paths["BRIDGE_VAR_DIR"] == str(home)
        assert paths["BRIDGE_SUPERVISOR_PIDFILE"].startswith(f"{home}/")
        if len(f"{home}/supervisor/supervisor.sock") <= runtime.SOCKET_PATH_LIMIT:
            assert paths["BRIDGE_SUPERVISOR_SOCKET"] == f"{home}/supervisor/supervisor.sock"


def test_a_var_dir_too_deep_for_a_unix_socket_gets_a_short_private_one_of_its_own(tmp_path):
    # given two var dirs whose socket paths would pass the unix socket limit
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    first, second = runtime.supervisor_paths(deep / "a"), runtime.supervisor_paths(deep / "b")
    # then each socket moves to a short path of its own; pid files and logs stay in the var dir
    assert first["BRIDGE_SUPERVISOR_SOCKET"] != second["BRIDGE_SUPERVISOR_SOCKET"]
    for paths in (first, second):
        assert len(paths["BRIDGE_SUPERVISOR_SOCKET"]) <= runtime.SOCKET_PATH_LIMIT
        assert paths["BRIDGE_SUPERVISOR_PIDFILE"].startswith(str(deep))
    # and its folder is private to this user
    folder = Path(first["BRIDGE_SUPERVISOR_SOCKET"]).parent
    try:
        runtime.prepare_supervisor_dirs(first)
        assert folder.stat().st_mode & 0o777 == 0o700
        # and a folder someone else could enter is refused rather than used
        folder.chmod(0o755)
        with pytest.raises(SystemExit, match="not private"):
            runtime.prepare_supervisor_dirs(first)
    finally:
        folder.rmdir()


def test_the_access_log_leaves_out_static_files_served_but_keeps_everything_else():
    quiet = runtime.QuietStaticAccessFilter()

    def record(path: str, status: str) -> logging.LogRecord:
        # as gunicorn logs it: the format string with a mapping of atoms as its one argument
        atoms = {"U": path, "s": status}
        return logging.LogRecord("gunicorn.access", logging.INFO, "", 0, "%(U)s", (atoms,), None)

    assert not quiet.filter(record("/static/admin/css/base.css", "200"))
    assert not quiet.filter(record("/static/unfold/js/app.js", "304"))
    assert quiet.filter(record("/static/missing.js", "404"))
    assert quiet.filter(record("/admin/login/", "200"))
    assert quiet.filter(record("/health/live", "200"))


@pytest.mark.servers
def test_make_run_does_not_announce_itself_when_another_process_answers_on_its_port(short_tmp):
    import http.server

    # given another web server already answering 200 on the port
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    env = bridge_env(short_tmp, PORT=str(port))
    prepare(env)
    try:
        # when Bridge is started on that port
        result = subprocess.run(
            [str(ROOT / "bin/run")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            start_new_session=True,
        )
    finally:
        other.shutdown()
    # then it fails, saying why, and keeps the generated password for a run that works
    assert result.returncode != 0
    assert "Bridge is up" not in result.stdout
    assert f"Port {port} is taken by another process" in result.stderr
    assert (short_tmp / "admin_password").exists()


# --- Probes while the database hangs ------------------------------------------------------


@pytest.mark.servers
def test_probes_answer_in_time_while_database_cache_and_broker_hang(tmp_path, hung_port):
    # given a web server whose database, cache and broker accept connections and never answer
    port = free_port()
    env = bridge_env(
        tmp_path,
        DEBUG="0",
        BRIDGE_LOCAL_RUN="1",
        DATABASE_URL=f"postgres://bridge:{SECRET}@127.0.0.1:{hung_port}/bridge",
        CELERY_BROKER_URL=f"redis://:{SECRET}@127.0.0.1:{hung_port}/0",
        REDIS_URL=f"redis://:{SECRET}@127.0.0.1:{hung_port}/1",
    )
    server = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/gunicorn"),
            "bridge.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{base}/health/live", server)
        # when the readiness probe is asked twice, and liveness around and after it
        live_before = timed_get(f"{base}/health/live")
        ready = [timed_get(f"{base}/health/ready") for _ in range(2)]
        live_after = [timed_get(f"{base}/health/live") for _ in range(5)]
    finally:
        server.terminate()
        server.wait(timeout=20)

    # then liveness answered ok within 100 ms each time, touching none of them
    for elapsed, status, _ in [live_before, *live_after]:
        assert status == 200
        assert elapsed < 0.1, elapsed
    # and readiness answered 503 within 2 s each time, naming the three
    for elapsed, status, body in ready:
        assert status == 503
        assert elapsed < 2.0, elapsed
        report = json.loads(body)
        assert report["failing"] == ["database", "cache", "broker"]
        assert report["checks"]["database"]["detail"].startswith("timed out")
        # without the URLs' credentials, host or port
        for leak in (SECRET, str(hung_port), "127.0.0.1"):
            assert leak not in body.decode()


# --- Error pages --------------------------------------------------------------------------


@pytest.mark.parametrize("accept", ["text/html", "text/plain"])
def test_the_debug_error_page_hides_connection_urls_as_it_hides_the_secret_key(rf, accept):
    # given settings whose connection URLs carry a password, as DEBUG's error page lists them
    database_url = f"postgres://bridge:{SECRET}@db.internal:5432/bridge"
    caches = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://:{SECRET}@cache.internal:6379/0",
        }
    }
    with override_settings(
        DEBUG=True,
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=f"amqp://bridge:{SECRET}@mq.internal:5672//",
        REDIS_URL=f"redis://:{SECRET}@cache.internal:6379/0",
        CACHES=caches,
        BACKUP_TARGET={"endpoint": f"sftp://backup:{SECRET}@store.internal/bridge"},
    ):
        # and a request whose environment holds one (runserver copies os.environ there)
        request = rf.get("/boom", HTTP_ACCEPT=accept)
        request.META["DATABASE_URL"] = database_url
        # when a view fails with the URL in a local variable
        try:
            target = database_url
            raise RuntimeError(f"cannot reach the database ({len(target)})")
        except RuntimeError:
            response = technical_500_response(request, *sys.exc_info())
    # then the page shows the settings, stars where the passwords were
    page = response.content.decode()
    assert response.status_code == 500
    assert "DATABASE_URL" in page and "CELERY_BROKER_URL" in page
    assert "********************" in page
    assert SECRET not in page


# --- Content-Security-Policy --------------------------------------------------------------


@pytest.mark.django_db
def test_every_page_and_api_response_carries_the_content_security_policy(client, admin_user):
    # given the console's staff user logged in
    client.force_login(admin_user)
    responses = {
        "console": client.get("/admin/"),
        "login page": client.get("/admin/login/"),
        "api docs": client.get("/api/docs/"),
        "api docs script": client.get("/api/docs/", {"script": ""}),
        "schema": client.get("/api/schema/"),
        "api call": client.post(
            "/api/security/auth/login", {"username": "x"}, content_type="application/json"
        ),
        "api 404": client.get("/api/no-such-endpoint"),
        "page 404": client.get("/no-such-page"),
        "live": client.get("/health/live"),
    }
    for name, response in responses.items():
        policy = response.get("Content-Security-Policy", "")
        assert "script-src 'self'" in policy, name
        assert "frame-ancestors 'none'" in policy, name
        assert "object-src 'none'" in policy, name
    assert responses["console"].status_code == 200
    assert responses["api docs"].status_code == 200


@pytest.mark.django_db
def test_swagger_ui_has_no_inline_script_so_that_script_src_self_runs_it(client, admin_user):
    client.force_login(admin_user)
    page = client.get("/api/docs/").content.decode()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert scripts
    for attributes, body in scripts:
        assert "src=" in attributes and body.strip() == ""
    init = client.get("/api/docs/", {"script": ""})
    assert init["Content-Type"].startswith("application/javascript")
    assert b"SwaggerUIBundle(" in init.content
