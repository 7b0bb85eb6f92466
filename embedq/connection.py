"""Connections to Redis: URLs (redis://, rediss://, unix://), checks, and a private server for one run."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis

from embedq.durable import locked
from embedq.errors import RedisUnavailable, UsageError

DEFAULT_URL = "redis://127.0.0.1:6379/0"
MIN_REDIS = (6, 2)  # XAUTOCLAIM arrived in 6.2


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is and how to reach it; TLS files apply to rediss:// URLs."""

    url: str = DEFAULT_URL
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_verify_hostname: bool = True
    socket_timeout: float = 30.0
    extra: dict[str, object] = field(default_factory=dict)


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(settings: RedisSettings, *, check: bool = True) -> redis.Redis:
    """A client for `settings.url`; with `check`, pings it and verifies the server version."""
    scheme = urlsplit(settings.url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise UsageError(
            f"Redis URL {redact(settings.url)!r} must start with redis://, rediss:// or unix://"
        )
    kwargs: dict[str, object] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": min(settings.socket_timeout, 5.0),
        "health_check_interval": 30,
        **settings.extra,
    }
    if scheme == "rediss":
        kwargs["ssl_ca_certs"] = settings.tls_ca
        kwargs["ssl_certfile"] = settings.tls_cert
        kwargs["ssl_keyfile"] = settings.tls_key
        kwargs["ssl_check_hostname"] = settings.tls_verify_hostname
        kwargs["ssl_cert_reqs"] = "required"
    try:
        client = redis.Redis.from_url(settings.url, **kwargs)
    except ValueError as exc:
        raise UsageError(f"Redis URL {redact(settings.url)!r} is not valid: {exc}") from exc
    if check:
        check_server(client, settings.url)
        logging.getLogger("embedq").debug("connected to Redis at %s", redact(settings.url))
    return client


def check_server(client: redis.Redis, url: str) -> None:
    """Raise RedisUnavailable with a clear reason if the server cannot serve embedq."""
    try:
        client.ping()
        version = str(client.info("server").get("redis_version", "0"))
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(
            f"Redis at {redact(url)} refused the credentials: {exc}. Put user and password in the "
            "URL (redis://USER:PASSWORD@HOST:PORT) or EMBEDQ_REDIS_URL."
        ) from exc
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
            raise RedisUnavailable(
                f"Redis at {redact(url)} needs a password or more permissions: {exc}."
            ) from exc
        raise RedisUnavailable(f"Redis at {redact(url)} answered with an error: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(
            f"Redis at {redact(url)} does not answer ({exc}). Start Redis, or pass --redis / "
            "EMBEDQ_REDIS_URL with the address of one."
        ) from exc
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if major_minor < MIN_REDIS:
        raise RedisUnavailable(
            f"Redis at {redact(url)} is version {version}; embedq needs {'.'.join(map(str, MIN_REDIS))} or later."
        )


def answers(url: str) -> bool:
    """True if a Redis server answers PING at `url` within a second."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _listening(url: str) -> bool:
    """True if something accepts connections at `url`'s address (a TCP port or a unix socket)."""
    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
                sock.settimeout(1.0)
                sock.connect(parts.path)
        else:
            socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1.0).close()
    except (OSError, ValueError):
        return False
    return True


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private `redis-server` on a free loopback port, for one run or one test; stop() ends it."""

    def __init__(self, *, appendonly: bool = False, appendfsync: str = "everysec",
                 directory: str | os.PathLike[str] | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable(
                "No Redis answers and redis-server is not installed, so embedq cannot start a "
                "private one. Install Redis (apt-get install redis-server) or pass --redis URL."
            )
        self._binary = binary
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="embedq-redis-"))
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(self.directory), "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--logfile", str(self.directory / "redis.log"),
            *self.extra_args,
        ]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:] if (
                    self.directory / "redis.log").exists() else ""
                raise RedisUnavailable(f"redis-server exited at start (code {self._process.returncode}): {log}")
            if (answers(self.url) and self._loaded()) or (self.extra_args and self._port_open()):
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer on port {self.port} within {timeout} s")

    def _loaded(self) -> bool:
        """Done loading its data: PING answers while an AOF still loads, other commands do not."""
        try:
            info = redis.Redis.from_url(self.url, socket_timeout=1.0).info("persistence")
        except (redis.RedisError, OSError):
            return False
        return int(info.get("loading", 1)) == 0

    def _port_open(self) -> bool:
        with contextlib.closing(socket.socket()) as sock:
            sock.settimeout(0.2)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL with `kill`, so nothing is flushed beyond what AOF already has)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            if kill:
                self._process.kill()
            else:
                self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def restart(self, *, kill: bool = True) -> None:
        """Stop and start again on the same port and directory (AOF, if on, is replayed)."""
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


PRIVATE_STATE = ".embedq-redis"
"""Where `embedq run` keeps the data of the private Redis it starts: inside the output directory
(readers skip names that start with a dot), so the run can resume and be verified afterwards."""


def kept_state(output_dir: str | os.PathLike[str]) -> Path | None:
    """The private Redis data an earlier `embedq run` kept in `output_dir`, if there is any."""
    state = Path(output_dir) / PRIVATE_STATE
    return state if (state / "appendonlydir").is_dir() else None


@contextlib.contextmanager
def redis_for_run(url: str | None, *, output_dir: str | os.PathLike[str], explicit: bool = False,
                  log: Callable[[str], None] = lambda _: None) -> Iterator[str]:
    """The Redis for `embedq run` and for the commands that look at its job afterwards.

    A Redis that the user named (`explicit`) is used as it is. Otherwise the private Redis whose
    data an earlier run kept in `output_dir` is started again, so the job resumes where it was;
    else the Redis at `url` (or the default) if anything listens there; else a private
    redis-server that keeps its data (AOF, fsync every second) in `output_dir`. A private server
    lives as long as the block and holds a lock on its data directory.
    """
    target = url or DEFAULT_URL
    kept = kept_state(output_dir)
    # Fall back only when nothing listens there. A server that listens but does not answer a plain
    # PING (it wants a password, TLS with a CA, or another user) is the user's Redis: the caller's
    # real connect must then fail with the reason (exit 5), not divert the job to a throwaway,
    # unencrypted private server.
    if (explicit or kept is None) and (answers(target) or _listening(target)):
        yield target
        return
    state = Path(output_dir) / PRIVATE_STATE

    def busy() -> None:
        raise UsageError(f"Another embedq command is using the Redis data in {state}; wait for it to finish "
                         "(or stop it) and run this again.")

    with locked(state / "lock", when_busy=busy):  # one server on one directory's data at a time
        _stop_orphan(state)
        with _private(state) as server:
            if kept is not None:
                log(f"resuming with the Redis data kept in {state} (private redis-server at {server.url})")
            else:
                log(f"Redis at {redact(target)} does not answer; started a private redis-server at {server.url} "
                    f"that keeps its data in {state}, so this command can be run again to resume")
            yield server.url


@contextlib.contextmanager
def _private(state: Path) -> Iterator[RedisServer]:
    """A private server on `state`'s data, its process id kept there while it runs."""
    with RedisServer(appendonly=True, directory=state) as server:
        pid_file = state / "server.pid"
        if server.pid is not None:
            pid_file.write_text(str(server.pid))
        try:
            yield server
        finally:
            pid_file.unlink(missing_ok=True)


def _stop_orphan(state: Path) -> None:
    """Stop the server a killed command left running on `state`'s data: two servers must never
    append to the same file."""
    pid_file = state / "server.pid"
    try:
        pid = int(pid_file.read_text())
        alive = b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if alive:
        os.kill(pid, signal.SIGTERM)  # it writes what it has to its AOF and exits
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


T = TypeVar("T")
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def retry_redis(call: Callable[[], T], *, give_up_after: float, what: str,
                log: Callable[[str], None] = lambda _: None,
                stopping: Callable[[], bool] = lambda: False) -> T:
    """Run `call`, retrying with exponential backoff (0.1 s to 5 s) while Redis is unreachable or
    loading its data after a restart; RedisUnavailable once `give_up_after` seconds have passed.

    Only calls that are safe to repeat belong here: every write embedq retries is idempotent.
    """
    delay, started, warned = 0.1, time.monotonic(), False
    while True:
        try:
            return call()
        except RETRYABLE as exc:
            waited = time.monotonic() - started
            if waited > give_up_after or stopping():
                raise RedisUnavailable(
                    f"Redis did not answer for {waited:.0f} s while trying to {what} ({exc}); giving up. "
                    "Nothing acknowledged is lost: unfinished batches are reclaimed when a worker runs again."
                ) from exc
            if not warned:
                log(f"Redis unreachable while trying to {what} ({exc}); retrying with backoff")
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
