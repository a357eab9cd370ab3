"""aiohttp imported without the CA store (ingest.sources.tls): an S3 client over https still
verifies against a CA bundle of its own, the verifying default fails closed, `ssl` is as before."""

from __future__ import annotations

import ssl
import subprocess
import sys

from aiobotocore.httpsession import AIOHTTPSession

import ingest.sources.s3  # noqa: F401  (imports aiohttp the way a worker does)


def test_an_https_client_brings_a_context_with_certificates_that_verifies() -> None:
    context, _ = AIOHTTPSession(verify=True)._build_ssl_contexts(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0


def test_the_standard_library_is_restored_after_the_import() -> None:
    assert ssl.create_default_context().cert_store_stats()["x509_ca"] > 0
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.set_default_verify_paths()
    assert bare.cert_store_stats()["x509_ca"] > 0


def test_aiohttp_defaults_fail_closed_and_the_ca_store_is_not_read() -> None:
    """In a fresh interpreter, as in the fork server: aiohttp's verifying default holds no
    certificate (nothing verifies against it) and still requires verification."""
    code = (
        "import ingest.sources.s3, aiohttp.connector as c, ssl\n"
        "v = c._SSL_CONTEXT_VERIFIED\n"
        "print(v.cert_store_stats()['x509_ca'], v.verify_mode == ssl.CERT_REQUIRED,"
        " v.check_hostname)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "True", "True"]
