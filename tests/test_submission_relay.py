"""Authenticated users relay, end to end, between two katerchen instances on 127.0.0.1.

A serves example.test and has submission listeners; B serves remote.test.  An authenticated
client of A sends to carol@remote.test, and the message ends in B's Maildir -- along A's
``[relay.routes]``, or through B used as A's smarthost with AUTH over verified TLS (so
katerchen's own relay client is one more real client of the AUTH code).  Nobody is a trusted
network here: AUTH alone allows the relaying.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from pathlib import Path

import pytest

from katerchen.config import Config
from tests.conftest import (
    HOSTNAME,
    TIMEOUT,
    USERS,
    Server,
    StartServer,
    TlsFiles,
    in_thread,
    issue_tls_files,
    log_lines,
    submission_address,
    wait_until,
    write_users,
)
from tests.test_delivery import read_maildir
from tests.test_relay_peers import REMOTE, make_relay_config, relay_finished, route_to

ALICE = "alice@example.test"
B_HOSTNAME = f"mx.{REMOTE}"
#: A's account at B, for the smarthost test.
A_AT_B = f"relay-a@{REMOTE}"
A_AT_B_PASSWORD = "A's smarthost password"
CONTENT = b"Subject: submitted at A\r\nMessage-ID: <auth-relay@example.test>\r\n\r\nHello B.\r\n"


def tls_and_auth(files: TlsFiles, users: Path, **auth: object) -> str:
    text = f'\n[tls]\ncertificate = "{files.certificate}"\nkey = "{files.key}"\n'
    text += f'\n[auth]\nusers_file = "{users}"\n'
    text += "".join(f"{k} = {str(v).lower()}\n" for k, v in auth.items())
    return text


def a_config(
    tmp_path: Path, files: TlsFiles, *, routes: dict[str, str] | None = None, **relay: object
) -> Config:
    root = tmp_path / "a"
    root.mkdir(parents=True, exist_ok=True)
    write_users(root / "users", USERS)
    return make_relay_config(
        root,
        server={"submission": ["127.0.0.1:0"]},
        routes=routes,
        relay=relay,
        extra=tls_and_auth(files, root / "users"),
    )


def submit(server: Server, files: TlsFiles) -> None:
    """BLOCKING: alice submits one message for carol@remote.test at *server*'s port 587."""
    host, port = submission_address(server)
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=TIMEOUT) as smtp:
        smtp.starttls(context=files.client_context())
        smtp.login(ALICE, USERS[ALICE])
        assert smtp.sendmail(ALICE, [f"carol@{REMOTE}"], CONTENT) == {}


def received_headers(message: bytes) -> list[str]:
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    return [" ".join(str(value).split()) for value in parsed.get_all("Received", [])]


async def delivered(server: Server, name: str) -> bytes:
    path = server.config.directories.domains / REMOTE / name
    await wait_until(lambda: read_maildir(path))
    (message,) = read_maildir(path)
    return message


async def test_an_authenticated_user_relays_to_another_instance(
    start_server: StartServer, tmp_path: Path, tls_files: TlsFiles
) -> None:
    b = await start_server(
        make_relay_config(tmp_path / "b", hostname=B_HOSTNAME, domains={REMOTE: ("carol",)}),
        deliver=True,
    )
    a = await start_server(a_config(tmp_path, tls_files, routes=route_to(b)), deliver=True)
    await in_thread(submit, a, tls_files)

    message = await delivered(b, "carol")
    assert message.endswith(CONTENT)
    at_b, at_a = received_headers(message)[:2]
    assert at_b.startswith(f"from {HOSTNAME} ([127.0.0.1])")
    assert at_a.startswith("from client.test ([127.0.0.1]) (using TLSv1.")
    assert f"by {HOSTNAME} (katerchen) with ESMTPSA id" in at_a
    await relay_finished(a.config)


async def test_katerchen_relays_through_a_smarthost_with_auth(
    start_server: StartServer,
    tmp_path: Path,
    tls_files: TlsFiles,
    mail_log: pytest.LogCaptureFixture,
) -> None:
    # B: remote.test's server, with a submission port where A has an account.  A submits in
    # its users' names, so B lets that account use any sender.
    b_root = tmp_path / "b"
    b_root.mkdir()
    b_files = issue_tls_files(tls_files.ca, b_root / "tls")
    write_users(b_root / "users", {A_AT_B: A_AT_B_PASSWORD})
    b = await start_server(
        make_relay_config(
            b_root,
            hostname=B_HOSTNAME,
            domains={REMOTE: ("carol", "relay-a")},
            server={"submission": ["127.0.0.1:0"]},
            extra=tls_and_auth(b_files, b_root / "users", allow_any_sender=True),
        ),
        deliver=True,
    )
    ca_file = tmp_path / "ca.pem"
    tls_files.ca.cert_pem.write_to_path(str(ca_file))
    host, port = submission_address(b)
    a = await start_server(
        a_config(
            tmp_path,
            tls_files,
            smarthost=f"{host}:{port}",
            smarthost_user=A_AT_B,
            smarthost_password=A_AT_B_PASSWORD,
            smarthost_tls="required",
            ca_file=str(ca_file),
        ),
        deliver=True,
    )
    await in_thread(submit, a, tls_files)

    message = await delivered(b, "carol")
    assert message.endswith(CONTENT)
    at_b = received_headers(message)[0]
    assert f"by {B_HOSTNAME} (katerchen) with ESMTPSA id" in at_b
    await relay_finished(a.config)
    # Both hops authenticated: alice at A, A's account at B.
    assert sorted(log_lines(mail_log, "auth")) == [
        f"auth ip=127.0.0.1 mechanism=PLAIN user={user}" for user in (ALICE, A_AT_B)
    ]
    assert A_AT_B_PASSWORD not in mail_log.text
