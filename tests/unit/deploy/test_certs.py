import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.deploy.certs import make_ca_and_server, make_supernode_key


def test_server_certificate_is_signed_by_the_ca_for_loopback(tmp_path):
    paths = make_ca_and_server(tmp_path, hosts=["fl.example.org"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc)
    assert (paths.root / "ca.key").stat().st_mode & 0o077 == 0 and paths.server_key.stat().st_mode & 0o077 == 0


def test_supernode_keys_are_openssh_ec_on_a_nist_curve(tmp_path):
    private, public = make_supernode_key(tmp_path, "phone-1")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key().public_numbers() == pub.public_numbers()
    assert private.stat().st_mode & 0o077 == 0
    import pytest

    with pytest.raises(ValueError, match="plain file name"):
        make_supernode_key(tmp_path, "../evil")
