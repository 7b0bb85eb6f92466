"""Security: a Redis with requirepass, ACL users and a TLS-only port, and a stream nobody trusts.

A private redis-server is started with a self-signed CA and server certificate made here, a
password for the default user (`requirepass`, used below as the administrator), and two ACL users,
one per tenant, each limited to its own key prefix and to the commands embedq sends (EMBEDQ_ACL).
The real CLI runs the whole job through `rediss://` as such a user. What is read from the stream
is never unpickled or executed: a pickle injected into the stream ends as a dead letter.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import pickle
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from embedq.connection import RedisServer, free_port
from embedq.keys import JobKeys
from embedq.protocol import PAYLOAD_FIELD
from tests.embedq.test_cli import embedq
from tests.support import write_jsonl
from tests.worker.test_bad_input import OpensAFile

# Everything embedq sends, and nothing else: proven sufficient by the flow below (the ACL log stays
# empty). No EVAL: scripts run by EVALSHA, loaded with SCRIPT LOAD, and a script's own calls are
# checked against these same rules. INFO is needed for the server version check at connect.
EMBEDQ_ACL = [
    "resetchannels", "-@all", "+ping", "+info",
    "+get", "+set", "+del", "+mget", "+scan", "+exists", "+expire",  # leases, the producer lock, `delete`
    "+persist",  # a finished job's manifest and dead letters keep their TTL until it changes again (archive.py)
    "+hget", "+hset", "+hsetnx", "+hmget", "+hgetall", "+hincrby", "+hdel", "+hkeys", "+hexists", "+hlen",  # records
    "+sadd", "+sismember", "+srem",  # parts that recovery condemned, entries a worker is working on
    "+xadd", "+xlen", "+xrange", "+xdel", "+xack", "+xreadgroup", "+xautoclaim", "+xclaim", "+xpending",
    "+xgroup|create",  # the streams
    "+evalsha", "+script|load",  # the publish, settle, split and replay scripts
    "+memory|usage",  # the job's memory before and after its compaction (optional: refused, it is not logged)
]
ADMIN_PASSWORD = "admin-pw-0451"
TENANTS = {"embedq": "secret-a-7781", "tenantb": "secret-b-9902"}  # user = key prefix -> password
JOB = "tls-job"
N_DOCS = 200


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                    signer: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = (builder
                       .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                                   x509.DNSName("localhost")]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "embedq test CA")])
    ca = certificate("embedq test CA", ca_key, ca_name, ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(server.public_bytes(pem))
    paths[2].write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


@dataclass(frozen=True)
class SecureRedis:
    """The TLS-only, password- and ACL-protected server of this module."""

    port: int
    ca: Path

    def url(self, user: str | None = None, password: str | None = None, scheme: str = "rediss") -> str:
        auth = f"{user or ''}:{password}@" if password is not None else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def tenant(self, user: str) -> str:
        return self.url(user, TENANTS[user])

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(password=ADMIN_PASSWORD), ssl_ca_certs=str(self.ca))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    directory = tmp_path_factory.mktemp("secure-redis")
    ca, cert, key = make_certificates(directory)
    port = free_port()
    users = [arg for name, password in TENANTS.items()
             for arg in ("--user", name, "on", f">{password}", f"~{name}:*", *EMBEDQ_ACL)]
    server = RedisServer(port=port, directory=directory, extra_args=(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--requirepass", ADMIN_PASSWORD, *users))
    with server:
        yield SecureRedis(port, ca)


def tenant_args(secure: SecureRedis, user: str = "embedq") -> tuple[str, ...]:
    return ("--redis", secure.tenant(user), "--tls-ca", str(secure.ca))


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


@dataclass(frozen=True)
class TlsJob:
    """A job produced and worked entirely over TLS as tenant `embedq`, with a pickle in its stream."""

    out: Path
    marker: Path
    pickle_entry: str
    produced: subprocess.CompletedProcess[str]
    worked: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def tls_job(secure: SecureRedis, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
            gloss_texts: list[str]) -> TlsJob:
    work = tmp_path_factory.mktemp("tls-job")
    ids = [*(f"g{i}" for i in range(N_DOCS - 1)), "empty"]
    source = write_jsonl(work / "docs.jsonl", ids, [*gloss_texts[:N_DOCS - 1], ""])
    tls = tenant_args(secure)
    produced = embedq("produce", str(source), "--job", JOB, "--batch-size", "50", "--model", str(tiny_model), *tls)
    marker = work / "unpickled"
    # Someone with write access to the stream adds a pickle that would open a file if unpickled.
    entry: Any = secure.admin().xadd(JobKeys(JOB).stream, {PAYLOAD_FIELD: pickle.dumps(OpensAFile(marker))})
    out = work / "out"
    worked = embedq("work", "--job", JOB, "--out", str(out), "--lease-seconds", "5", *tls)
    return TlsJob(out, marker, entry.decode(), produced, worked)


def keys_of(client: redis.Redis) -> list[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(count=1000))


def stored_bytes(client: redis.Redis) -> bytes:
    """Every key and value in the server, concatenated (strings, hashes and streams: what embedq writes)."""
    out: list[bytes] = []
    for key in keys_of(client):
        kind: Any = client.type(key)
        value: Any = None
        out.append(key.encode())
        if kind == b"string":
            out.append(client.get(key) or b"")  # type: ignore[arg-type]
        elif kind == b"hash":
            value = client.hgetall(key)
            out.extend(b for pair in value.items() for b in pair)
        elif kind == b"stream":
            value = client.xrange(key)
            out.extend(b for _, fields in value for pair in fields.items() for b in pair)
    return b"\0".join(out)


def test_produce_work_and_verify_run_over_tls_as_an_acl_user_with_only_embedqs_commands(
        secure: SecureRedis, tls_job: TlsJob) -> None:
    assert tls_job.produced.returncode == 0, output_of(tls_job.produced)
    assert tls_job.worked.returncode == 0 and "job complete" in tls_job.worked.stdout, output_of(tls_job.worked)
    verified = embedq("verify", "--job", JOB, "--out", str(tls_job.out), "--allow-dead-letters",
                      *tenant_args(secure))
    assert verified.returncode == 0 and "OK" in verified.stdout, output_of(verified)
    assert f"output rows        {N_DOCS - 1:,}" in verified.stdout
    status = json.loads(embedq("status", "--job", JOB, "--json", *tenant_args(secure)).stdout)
    assert status["complete"] and status["committed_documents"] == N_DOCS - 1 and status["dead_documents"] == 1
    admin = secure.admin()
    denied = [e for e in admin.acl_log() if e["reason"] != "auth" and e["username"] == "embedq"]
    assert denied == [], "embedq sent a command the narrow ACL does not allow"
    assert all(k.startswith(f"embedq:{{{JOB}}}:") for k in keys_of(admin)), keys_of(admin)
    # And the user really is that narrow: no EVAL, no FLUSHALL, no key outside its prefix.
    assert "no permissions" in admin.execute_command("ACL", "DRYRUN", "embedq", "FLUSHALL").decode()
    assert "no permissions" in admin.execute_command("ACL", "DRYRUN", "embedq", "EVAL", "return 1", "0").decode()
    assert "no permissions" in admin.execute_command("ACL", "DRYRUN", "embedq", "GET", "tenantb:x").decode()


def test_a_pickle_in_the_stream_is_dead_lettered_unread_and_never_executed(secure: SecureRedis,
                                                                            tls_job: TlsJob) -> None:
    assert tls_job.worked.returncode == 0, output_of(tls_job.worked)
    assert not tls_job.marker.exists(), "a payload read from Redis was unpickled"
    listed = embedq("dead-letter", "list", "--job", JOB, "--json", *tenant_args(secure))
    assert listed.returncode == 0, output_of(listed)
    letters = {d["entry_id"]: d for d in map(json.loads, listed.stdout.splitlines())}
    letter = letters[tls_job.pickle_entry]
    assert letter["reason"] == "malformed message" and "does not match the batch schema" in letter["error"]
    assert letter["worker"] != "producer" and letter["deliveries"] == 1 and not letter["replayable"]
    assert [d["doc_ids"] for d in letters.values() if d["worker"] == "producer"] == [["empty"]]


@pytest.mark.parametrize(("make_url", "tls", "message"), [
    (lambda s: s.url("embedq", "wrong-password"), True, "refused the credentials"),
    (lambda s: s.url("nobody", "secret-a-7781"), True, "refused the credentials"),
    (lambda s: s.url(), True, "Authentication required"),
    (lambda s: s.tenant("embedq").replace("rediss://", "redis://"), False, "does not answer"),
    (lambda s: s.tenant("embedq"), False, "certificate verify failed"),
], ids=["wrong password", "unknown user", "no password", "plain redis:// to the TLS port", "CA not given"])
def test_a_connection_that_is_refused_exits_5_with_the_reason_and_no_password(
        secure: SecureRedis, make_url: Callable[[SecureRedis], str], tls: bool, message: str) -> None:
    url = make_url(secure)
    result = embedq("status", "--job", JOB, "--redis", url, *(("--tls-ca", str(secure.ca)) if tls else ()))
    assert result.returncode == 5, output_of(result)
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert all(password not in output_of(result) for password in (*TENANTS.values(), "wrong-password"))


def test_run_with_a_refused_password_exits_5_instead_of_starting_a_private_redis(
        secure: SecureRedis, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", [1, 2], ["one", "two"])
    result = embedq("run", str(source), "--out", str(tmp_path / "out"), "--redis",
                    secure.url("embedq", "wrong-password"), env={"EMBEDQ_TLS_CA": str(secure.ca)})
    assert result.returncode == 5, output_of(result)
    assert "refused the credentials" in result.stderr and "private redis-server" not in result.stderr
    assert "wrong-password" not in output_of(result) and "Traceback" not in result.stderr


def test_a_second_tenant_with_its_own_key_prefix_keeps_even_a_same_named_job_apart(
        secure: SecureRedis, tls_job: TlsJob, tiny_model: Path, tmp_path: Path) -> None:
    admin = secure.admin()
    first_tenant = {k: admin.type(k) for k in keys_of(admin) if k.startswith("embedq:")}
    record = admin.hget(JobKeys(JOB).meta, "record")
    source = write_jsonl(tmp_path / "docs.jsonl", list(range(30)), [f"tenant b text {i}" for i in range(30)])
    # `embedq run` over rediss:// (the CA from the environment), with the same job name as tenant A.
    result = embedq("-v", "run", str(source), "--out", str(tmp_path / "out"), "--job", JOB, "--key-prefix",
                    "tenantb", "--model", str(tiny_model), "--redis", secure.tenant("tenantb"),
                    env={"EMBEDQ_TLS_CA": str(secure.ca)})
    assert result.returncode == 0 and "30 documents embedded" in result.stdout, output_of(result)
    assert "private redis-server" not in result.stderr  # it used this server, not a throwaway one
    assert TENANTS["tenantb"] not in output_of(result), "the password was printed"
    second_tenant = [k for k in keys_of(admin) if k.startswith("tenantb:")]
    assert second_tenant and all(k.startswith(f"tenantb:{{{JOB}}}:") for k in second_tenant)
    assert {k: admin.type(k) for k in keys_of(admin) if k.startswith("embedq:")} == first_tenant
    assert admin.hget(JobKeys(JOB).meta, "record") == record
    assert set(keys_of(admin)) == set(first_tenant) | set(second_tenant)
    assert all(p.encode() not in stored_bytes(admin) for p in TENANTS.values()), "a password was stored in Redis"
    status = json.loads(embedq("status", "--job", JOB, "--json", "--key-prefix", "tenantb",
                               *tenant_args(secure, "tenantb")).stdout)
    assert status["committed_documents"] == 30 and status["documents"] == 30


def test_a_tenant_reaching_outside_its_key_prefix_exits_5_with_a_clear_message(secure: SecureRedis) -> None:
    result = embedq("status", "--job", JOB, *tenant_args(secure, "tenantb"))  # tenant A's prefix, embedq
    assert result.returncode == 5, output_of(result)
    assert "permission" in result.stderr and "Traceback" not in result.stderr
