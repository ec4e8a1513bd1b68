"""Transport security and the token: TLS and mutual TLS on a real server on 127.0.0.1, the refusal to listen
beyond this machine without a token and TLS, tokens from a file."""

import datetime
import ipaddress
import json

import pytest

from client.sdk import EditLensError, PermissionDeniedError, UnauthenticatedError
from server.config import ServerConfig, is_loopback
from vlm.options import ConfigError


def _pki(folder):
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, all signed by the CA;
    and a second CA that signed nothing here. Returns the PEM file paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, ca=False, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(obj, path, private=False):
        data = (
            obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if private
            else obj.public_bytes(serialization.Encoding.PEM)
        )
        path.write_bytes(data)
        return path

    out = {}
    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = cert("editlens test CA", ca_key, "editlens test CA", ca_key, ca=True)
    other = cert("another CA", other_key, "another CA", other_key, ca=True)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = cert("localhost", server_key, "editlens test CA", ca_key, san=san)
    client = cert("a client", client_key, "editlens test CA", ca_key)
    out["ca"] = write(ca, folder / "ca.pem")
    out["other_ca"] = write(other, folder / "other-ca.pem")
    out["server_cert"] = write(server, folder / "server.pem")
    out["server_key"] = write(server_key, folder / "server.key", private=True)
    out["client_cert"] = write(client, folder / "client.pem")
    out["client_key"] = write(client_key, folder / "client.key", private=True)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _pki(tmp_path_factory.mktemp("pki"))


def test_tls_server_answers_a_client_that_trusts_its_ca_and_no_other(start_service, pki):
    svc = start_service(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    with svc.client(tls_ca=pki["ca"]) as lens:
        assert lens.info().ready
    with svc.client(tls_ca=pki["other_ca"], timeout=5) as lens, pytest.raises(EditLensError):
        lens.info()  # the certificate does not verify against another CA
    with svc.client(timeout=5) as lens, pytest.raises(EditLensError):
        lens.info()  # plaintext to a TLS port


def test_mutual_tls_refuses_a_client_without_a_certificate(start_service, pki):
    svc = start_service(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    with svc.client(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"]) as lens:
        assert lens.info().ready
    with svc.client(tls_ca=pki["ca"], timeout=5) as lens, pytest.raises(EditLensError):
        lens.info()


def test_the_token_travels_over_tls_and_is_checked(start_service, pki):
    svc = start_service(token="s3cret", tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    with svc.client(tls_ca=pki["ca"]) as lens, pytest.raises(UnauthenticatedError):
        lens.rollback(adapter="nothing")
    with svc.client(token="wrong", tls_ca=pki["ca"]) as lens, pytest.raises(PermissionDeniedError):
        lens.rollback(adapter="nothing")


@pytest.mark.parametrize(
    "host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("10.1.2.3", False)]
)
def test_loopback_is_told_apart(host, loopback):
    assert is_loopback(host) is loopback


def test_listening_beyond_this_machine_needs_a_token_and_tls_or_insecure(pki, tmp_path):
    with pytest.raises(ConfigError, match="without a token and TLS"):
        ServerConfig(host="0.0.0.0", token=None).check()
    with pytest.raises(ConfigError, match="without TLS"):
        ServerConfig(host="0.0.0.0", token="t").check()
    ServerConfig(host="0.0.0.0", insecure=True).check()  # said explicitly
    tls = {"tls_cert": pki["server_cert"], "tls_key": pki["server_key"]}
    ServerConfig(host="0.0.0.0", token="t", **tls).check()
    ServerConfig(host="127.0.0.1").check()  # loopback: as before
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        ServerConfig(tls_cert=pki["server_cert"]).check()
    with pytest.raises(ConfigError, match="no file"):
        ServerConfig(tls_cert=tmp_path / "missing.pem", tls_key=pki["server_key"]).check()
    with pytest.raises(ConfigError, match="needs the server's own"):
        ServerConfig(tls_client_ca=pki["ca"]).check()


def test_the_token_comes_from_a_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    cfg = ServerConfig(token_file=path)
    cfg.check()
    assert cfg.token == "from-a-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        ServerConfig(token_file=tmp_path / "empty").check()
    with pytest.raises(ConfigError, match="cannot read the token file"):
        ServerConfig(token_file=tmp_path / "missing").check()


def test_the_cli_refuses_to_serve_the_network_in_the_clear_and_reads_tls_and_token_files(
    start_service, pki, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from client.cli import app

    run = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert run.exit_code != 0 and "--insecure" in run.output
    svc = start_service(token="from-file", tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    token = tmp_path / "token"
    token.write_text("from-file\n")
    monkeypatch.delenv("EDITLENS_TOKEN", raising=False)
    base = ["--tls-ca", str(pki["ca"]), "--token-file", str(token)]
    ok = CliRunner().invoke(app, [*base, "rollback", "--server", svc.address, "--adapter", "nothing"])
    assert "NOT_FOUND" in ok.output and "UNAUTHENTICATED" not in ok.output, ok.output
    plain = CliRunner().invoke(app, ["versions", "--server", svc.address])
    assert plain.exit_code != 0 and "UNAVAILABLE" in plain.output


def test_every_mutation_is_recorded_with_its_time_and_caller(start_service, pki, test_cases, world_dir):
    """Edit, promote, rollback and delete over mutual TLS with a token: the adapter's audit tags say what
    happened, when, from which peer, with which client certificate; the version's manifest says it too."""
    tls = {"tls_cert": pki["server_cert"], "tls_key": pki["server_key"], "tls_client_ca": pki["ca"]}
    svc = start_service(token="t0k", **tls)
    case = test_cases[0]
    client = {"tls_ca": pki["ca"], "tls_cert": pki["client_cert"], "tls_key": pki["client_key"]}
    with svc.client(token="t0k", **client) as lens:
        args = (world_dir / case["image"], case["src"], case["constraint"], case["alt"])
        first = lens.edit(*args, adapter="audited", editor="multedit", layer=0)
        second = lens.edit(*args, adapter="audited", editor="multedit", layer=0, promote=False)
        lens.promote(second.version, adapter="audited")
        lens.rollback(adapter="audited")
        lens.delete(second.version, adapter="audited")
        manifest = lens.version(first.version, adapter="audited").manifest
    log = svc.registry.audit_log("audited")
    assert [e["action"] for e in log] == ["edit", "edit", "set_alias", "rollback", "delete_version"]
    assert [e.get("version") for e in log] == [first.version, second.version, second.version, None, second.version]
    for e in log:
        assert e["client_certificate"] == "a client" and e["token"] == "valid" and "127.0.0.1" in e["peer"]
        assert e["time"].endswith("+00:00") and "t0k" not in json.dumps(e)
    assert log[3]["previous"] == second.version and log[3]["live"] == first.version
    assert manifest["audit"]["action"] == "edit" and manifest["audit"]["client_certificate"] == "a client"
