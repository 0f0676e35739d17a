"""Media fetching: data URIs, the SSRF guard against a local server that records hits, caps,
timeouts, the domain allow-list and local files. Nothing leaves 127.0.0.0/8."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from model_runtime.errors import MediaError, MediaTooLargeError
from server.media import IPAddress, MediaFetcher, decode_data_uri, domain_allowed, is_public_address
from server.settings import Settings
from tests.http_recorder import FAKE_IMAGE, Recorder, serve

IMAGE = FAKE_IMAGE  # what the recorder serves at /img


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pretend_public(ip: IPAddress) -> bool:
    return ip == ipaddress.ip_address("127.0.0.2") or is_public_address(ip)


def fetcher(**overrides: Any) -> MediaFetcher:
    return MediaFetcher(Settings(**overrides))


# -- data URIs -----------------------------------------------------------------------------------


def test_data_uris() -> None:
    encoded = base64.b64encode(IMAGE).decode()
    assert decode_data_uri(f"data:image/png;base64,{encoded}", "image", 100) == IMAGE
    assert decode_data_uri(f"data:video/mp4;base64,{encoded}", "video", 100) == IMAGE
    for bad in (
        f"data:text/html;base64,{encoded}",  # not an image
        f"data:video/mp4;base64,{encoded}",  # a video where an image belongs
        f"data:image/png,{encoded}",  # not base64
        "data:image/png;base64,not*base64!",
        "data:image/png;base64,",
        "data:image/png;base64",
    ):
        with pytest.raises(MediaError):
            decode_data_uri(bad, "image", 100, param="p")


def test_oversized_data_uri_refused_on_encoded_length() -> None:
    # Invalid base64 of a huge length: refused as too large without trying to decode it.
    with pytest.raises(MediaTooLargeError):
        decode_data_uri("data:image/png;base64," + "!" * 200, "image", 100)
    with pytest.raises(MediaTooLargeError):  # 136 characters decode to 102 bytes > 100
        decode_data_uri("data:image/png;base64," + base64.b64encode(b"x" * 102).decode(), "image", 100)


# -- SSRF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "240.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "fe80::1",
     "fc00::1", "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "::"],
)  # fmt: skip
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.anyio
async def test_ssrf_direct_urls_refused(target: Recorder) -> None:
    port = target.server_address[1]
    f = fetcher()
    for url in (
        f"{target.base}/img",
        f"http://[::1]:{port}/img",
        f"http://[::ffff:127.0.0.1]:{port}/img",
        f"http://localhost:{port}/img",  # a name resolving to loopback
        f"http://2130706433:{port}/img",  # 127.0.0.1 as a decimal number
        f"http://0.0.0.0:{port}/img",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/img",
        f"http://user:pw@127.0.0.1:{port}/img",
    ):
        with pytest.raises(MediaError) as info:
            await f.fetch(url, "image", param="messages[0].content[0].image_url.url")
        assert info.value.param == "messages[0].content[0].image_url.url"
    await f.aclose()
    assert target.hits == []


@pytest.mark.anyio
async def test_ssrf_any_private_answer_refuses_the_host() -> None:
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["93.184.216.34", "10.0.0.7"]  # one public, one private: refused

    f = MediaFetcher(Settings(), resolver=resolver)
    with pytest.raises(MediaError, match="private"):
        await f.fetch("http://mixed.example/img", "image")
    await f.aclose()
    assert lookups == ["mixed.example"]


@pytest.mark.anyio
@pytest.mark.parametrize("hop", ["direct", "two-hops"])
async def test_ssrf_redirect_to_loopback_refused(target: Recorder, public_server: Recorder, hop: str) -> None:
    f = MediaFetcher(Settings(), address_allowed=pretend_public)
    # Sanity: the "public" server is reachable through the guard.
    public_server.redirect_to = f"{public_server.base}/img"
    assert await f.fetch(f"{public_server.base}/redirect", "image") == IMAGE
    start = "/redirect" if hop == "direct" else "/hop"
    for location in (
        f"{target.base}/img",
        f"http://localhost:{target.server_address[1]}/img",
        "file:///etc/passwd",
    ):
        public_server.redirect_to = location
        with pytest.raises(MediaError):
            await f.fetch(f"{public_server.base}{start}", "image")
    await f.aclose()
    assert target.hits == []
    assert public_server.hits.count("/redirect") == 4


@pytest.mark.anyio
@pytest.mark.parametrize(
    "location",
    ["data:image/png;base64,iVBORw0KGgo=", "mailto:a@b.c", "ftp://example.com/x.png", "javascript:alert(1)"],
)
async def test_a_redirect_to_anything_but_http_is_a_media_error(
    public_server: Recorder, location: str
) -> None:
    f = MediaFetcher(Settings(), address_allowed=pretend_public)
    public_server.redirect_to = location
    with pytest.raises(MediaError, match="http"):
        await f.fetch(f"{public_server.base}/redirect", "image", param="messages[0].content[0].image_url.url")
    await f.aclose()


@pytest.mark.anyio
async def test_redirects_are_capped(public_server: Recorder) -> None:
    f = MediaFetcher(Settings(media_max_redirects=2), address_allowed=pretend_public)
    with pytest.raises(MediaError, match="more than 2"):
        await f.fetch(f"{public_server.base}/loop", "image")
    await f.aclose()
    assert public_server.hits == ["/loop"] * 3


@pytest.mark.anyio
async def test_private_networks_allowed_only_when_configured(target: Recorder) -> None:
    f = fetcher(media_allow_private_networks=True)
    assert await f.fetch(f"{target.base}/img", "image") == IMAGE
    assert await f.fetch(f"http://localhost:{target.server_address[1]}/img", "image") == IMAGE
    with pytest.raises(MediaError, match="HTTP 404"):
        await f.fetch(f"{target.base}/missing", "image")
    await f.aclose()


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_https_goes_to_the_vetted_ip_and_checks_the_certificate_name(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=media.test",
         "-addext", "subjectAltName=DNS:media.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # both names point at the test server; only one is on its certificate

    settings = Settings(media_allow_private_networks=True)
    f = MediaFetcher(settings, resolver=resolver, ssl_context=client_tls)
    with serve("127.0.0.1", server_tls) as server:
        port = server.server_address[1]
        assert await f.fetch(f"https://media.test:{port}/img", "image") == IMAGE
        with pytest.raises(MediaError):
            await f.fetch(f"https://other.test:{port}/img", "image")
        assert server.hits == ["/img"]
    await f.aclose()


# -- caps and timeouts ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
async def test_byte_cap_cuts_off(target: Recorder, path: str) -> None:
    f = fetcher(media_allow_private_networks=True, max_image_bytes=1000)
    with pytest.raises(MediaTooLargeError):
        await f.fetch(target.base + path, "image")
    await f.aclose()


@pytest.mark.anyio
async def test_dripping_server_cut_off_by_total_deadline(target: Recorder) -> None:
    # Each byte arrives well within the read timeout; only the total deadline stops it.
    f = fetcher(media_allow_private_networks=True, media_read_timeout_s=2.0, media_fetch_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(MediaError, match="Timed out"):
        await f.fetch(f"{target.base}/drip", "image")
    assert time.monotonic() - started < 1.5
    await f.aclose()


# -- allow-list ----------------------------------------------------------------------------------


def test_domain_allow_list_matching() -> None:
    assert domain_allowed("anything.org", None)
    assert domain_allowed("Img.Example.org.", ["img.example.org"])
    assert not domain_allowed("evil.org", ["img.example.org"])
    assert not domain_allowed("sub.img.example.org", ["img.example.org"])
    assert domain_allowed("a.cdn.org", ["*.cdn.org"]) and not domain_allowed("cdn.org", ["*.cdn.org"])
    assert not domain_allowed("evilcdn.org", ["*.cdn.org"])


@pytest.mark.anyio
async def test_allow_list_applies_before_resolving(target: Recorder) -> None:
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    settings = Settings(allowed_media_domains=["media.test"], media_allow_private_networks=True)
    f = MediaFetcher(settings, resolver=resolver)
    port = target.server_address[1]
    assert await f.fetch(f"http://media.test:{port}/img", "image") == IMAGE
    with pytest.raises(MediaError, match="allowed domains"):
        await f.fetch(f"http://other.test:{port}/img", "image")
    await f.aclose()
    assert lookups == ["media.test"] and target.hits == ["/img"]


# -- local files ---------------------------------------------------------------------------------


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(IMAGE)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.txt", allowed / "link.png")
    return allowed


@pytest.mark.anyio
async def test_local_files_refused_by_default(media_dir: Path) -> None:
    f = fetcher()
    for url in (f"file://{media_dir}/cat.png", f"{media_dir}/cat.png", "file:///etc/passwd"):
        with pytest.raises(MediaError, match="disabled"):
            await f.fetch(url, "image")
    await f.aclose()


@pytest.mark.anyio
async def test_local_files_only_inside_the_allowed_dir(media_dir: Path) -> None:
    f = fetcher(allowed_local_media_path=str(media_dir), max_image_bytes=len(IMAGE))
    assert await f.fetch(f"file://{media_dir}/cat.png", "image") == IMAGE
    assert await f.fetch(f"{media_dir}/cat.png", "image") == IMAGE
    for url in (
        f"file://{media_dir}/../secret.txt",  # '..' escape
        f"file://{media_dir}/%2e%2e/secret.txt",  # the same, percent-encoded
        f"file://{media_dir}/link.png",  # symlink escape
        f"file://{media_dir.parent}/secret.txt",  # outside
        f"file://{media_dir}/missing.png",
        f"file://{media_dir}",  # a directory
        f"file://otherhost{media_dir}/cat.png",
        "cat.png",  # relative
    ):
        with pytest.raises(MediaError):
            await f.fetch(url, "image")
    await f.aclose()
    big = fetcher(allowed_local_media_path=str(media_dir), max_image_bytes=len(IMAGE) - 1)
    with pytest.raises(MediaTooLargeError):
        await big.fetch(f"{media_dir}/cat.png", "image")
    await big.aclose()
