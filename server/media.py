"""image_url / video_url -> bytes, with size caps, timeouts and an SSRF guard.

URL kinds: `data:` (base64), `http(s)://`, and `file://` or absolute paths (only under
`allowed_local_media_path`). For http(s) every hop, redirects included, is vetted before any
connection: the host must pass the domain allow-list, and every address it resolves to must be
public. The request then goes to the vetted address itself (the URL's host replaced by the IP,
`Host` header and TLS SNI/certificate check kept on the name), so a DNS answer that changes
between check and connect (rebinding) cannot redirect it. Decoding is the engine's job.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from model_runtime.errors import MediaError, MediaTooLargeError
from server.settings import Settings

MediaKind = Literal["image", "video"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
AddressPolicy = Callable[[IPAddress], bool]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


async def system_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo in the loop's executor, so a slow DNS server does not block the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_public_address(ip: IPAddress) -> bool:
    """False for loopback, private, link-local (cloud metadata), multicast, reserved, unspecified,
    and for IPv6 forms that embed such an IPv4 address (mapped, compatible, 6to4, NAT64, Teredo)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d: judge that address alone
            return is_public_address(ip.ipv4_mapped)
        embedded: ipaddress.IPv4Address | None = ip.sixtofour
        if embedded is None and ip.teredo:
            embedded = ip.teredo[1]
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and int(ip) >> 32 == 0 and int(ip) > 1:
            embedded = ipaddress.IPv4Address(int(ip))  # deprecated IPv4-compatible ::a.b.c.d
        if embedded is not None and not is_public_address(embedded):
            return False
    blocked = (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    )
    return ip.is_global and not blocked


def domain_allowed(host: str, allowed: list[str] | None) -> bool:
    """None allows any host; 'example.org' matches itself only, '*.example.org' its subdomains."""
    if allowed is None:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]:
            return True
        if host == entry:
            return True
    return False


def decode_data_uri(url: str, kind: MediaKind, max_bytes: int, param: str | None = None) -> bytes:
    """data:<kind>/<subtype>[;params];base64,<payload> -> bytes, size checked before decoding."""
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise MediaError("Malformed data URI: no ',' before the payload.", param=param)
    mediatype, *params = header.split(";")
    if not mediatype.strip().lower().startswith(f"{kind}/"):
        raise MediaError(f"Expected a data:{kind}/... URI for this {kind}.", param=param)
    if "base64" not in (p.strip().lower() for p in params):
        raise MediaError("Only base64-encoded data URIs are supported.", param=param)
    # 4 characters encode 3 bytes: refuse on the encoded length, before allocating the decoded copy.
    if len(payload) > 4 * ((max_bytes + 2) // 3):
        raise _too_large(kind, max_bytes, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"The {kind} data URI is not valid base64.", param=param) from None
    if len(data) > max_bytes:
        raise _too_large(kind, max_bytes, param)
    if not data:
        raise MediaError(f"The {kind} data URI is empty.", param=param)
    return data


class MediaFetcher:
    """Fetches media bytes for the chat layer; one instance (and one HTTP client) per server."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Resolver = system_resolver,
        address_allowed: AddressPolicy = is_public_address,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._settings = settings
        self._resolver = resolver
        self._address_allowed = address_allowed
        timeout = httpx.Timeout(
            connect=settings.media_connect_timeout_s,
            read=settings.media_read_timeout_s,
            write=settings.media_read_timeout_s,
            pool=settings.media_connect_timeout_s,
        )
        self._client = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            # A proxy from the environment would connect to the name, not to the vetted address.
            trust_env=False,
            # Pooled connections are keyed by IP; one made for host A must not carry host B's request.
            limits=httpx.Limits(max_keepalive_connections=0),
            verify=ssl_context or True,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, kind: MediaKind, param: str | None = None) -> bytes:
        """The media's bytes, or MediaError (400) / MediaTooLargeError (413) naming `param`."""
        max_bytes = self._settings.max_image_bytes if kind == "image" else self._settings.max_video_bytes
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match else ""
        if scheme == "data":
            return decode_data_uri(url, kind, max_bytes, param)
        if scheme in ("http", "https"):
            return await self._fetch_http(url, kind, max_bytes, param)
        if scheme == "file" or (scheme == "" and url.startswith("/")):
            return await asyncio.to_thread(self._read_local, url, kind, max_bytes, param)
        raise MediaError(f"Unsupported {kind} URL; use https://, http:// or a data: URI.", param=param)

    # -- http(s) ---------------------------------------------------------------------------------

    async def _fetch_http(self, url: str, kind: MediaKind, max_bytes: int, param: str | None) -> bytes:
        try:
            # The total deadline covers every hop: a server dripping one byte per read timeout
            # would otherwise hold the request forever.
            return await asyncio.wait_for(
                self._follow(url, kind, max_bytes, param), self._settings.media_fetch_timeout_s
            )
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise MediaError(f"Timed out fetching the {kind} URL.", param=param) from None
        except httpx.InvalidURL:  # a redirect to data:, mailto:, javascript:... (httpx parses it eagerly)
            raise MediaError(
                f"The {kind} URL redirected to a URL that is not http:// or https://.", param=param
            ) from None
        except httpx.HTTPError:
            raise MediaError(f"Could not fetch the {kind} URL.", param=param) from None

    async def _follow(self, url: str, kind: MediaKind, max_bytes: int, param: str | None) -> bytes:
        for _ in range(self._settings.media_max_redirects + 1):
            request = await self._vetted_request(url, param)
            response = await self._client.send(request, stream=True)
            try:
                if response.has_redirect_location:
                    try:
                        url = urljoin(url, response.headers["location"])
                    except ValueError:
                        raise MediaError(
                            f"The {kind} URL redirected to a malformed URL.", param=param
                        ) from None
                    continue
                if response.status_code != 200:
                    raise MediaError(f"The {kind} URL returned HTTP {response.status_code}.", param=param)
                return await _read_capped(response, kind, max_bytes, param)
            finally:
                await response.aclose()
        raise MediaError(
            f"The {kind} URL redirected more than {self._settings.media_max_redirects} times.", param=param
        )

    async def _vetted_request(self, url: str, param: str | None) -> httpx.Request:
        """Check one hop and build a request pinned to the address that passed the check."""
        try:
            parsed = httpx.URL(url)
            # The ASCII (punycode) form: what DNS, SNI and the Host header all use.
            host = parsed.raw_host.decode("ascii").lower()
            netloc = parsed.netloc.decode("ascii")
        except (httpx.InvalidURL, ValueError):  # ValueError covers IDNA's UnicodeError
            raise MediaError("The media URL is malformed.", param=param) from None
        if parsed.scheme not in ("http", "https"):
            raise MediaError("Media URLs (and their redirects) must be http:// or https://.", param=param)
        if not host:
            raise MediaError("The media URL has no host.", param=param)
        if parsed.userinfo:
            raise MediaError("Credentials in media URLs are not allowed.", param=param)
        if not domain_allowed(host, self._settings.allowed_media_domains):
            raise MediaError("The media URL's host is not in the allowed domains.", param=param)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if not 0 < port < 65536:  # getaddrinfo would wrap 99999 around to some other port
            raise MediaError("The media URL's port is invalid.", param=param)
        addresses = await self._resolve(host, port, param)
        if not self._settings.media_allow_private_networks and not all(map(self._address_allowed, addresses)):
            raise MediaError(
                "The media URL resolves to a loopback, private, link-local or reserved address; refused.",
                param=param,
            )
        try:
            pinned = parsed.copy_with(host=str(addresses[0]))
        except (httpx.InvalidURL, ValueError):
            raise MediaError("The media URL's address cannot be used.", param=param) from None
        extensions = {} if _is_ip_literal(host) or parsed.scheme != "https" else {"sni_hostname": host}
        return self._client.build_request(
            "GET",
            pinned,
            # identity: a compressed body would be inflated past the byte cap inside one chunk.
            headers={"Host": netloc, "Accept-Encoding": "identity"},
            extensions=extensions,
        )

    async def _resolve(self, host: str, port: int, param: str | None) -> list[IPAddress]:
        if _is_ip_literal(host):
            return [ipaddress.ip_address(host)]
        try:
            found = await self._resolver(host, port)
            addresses = [ipaddress.ip_address(a) for a in found]
        except (OSError, ValueError):
            raise MediaError("The media URL's host could not be resolved.", param=param) from None
        if not addresses:
            raise MediaError("The media URL's host could not be resolved.", param=param)
        return addresses

    # -- local files -----------------------------------------------------------------------------

    def _read_local(self, url: str, kind: MediaKind, max_bytes: int, param: str | None) -> bytes:
        root = self._settings.allowed_local_media_path
        if root is None:
            raise MediaError("Local media paths are disabled on this server.", param=param)
        if url.startswith("file:"):
            try:
                parts = urlsplit(url)
            except ValueError:
                raise MediaError("The file:// URL is malformed.", param=param) from None
            if parts.netloc not in ("", "localhost"):
                raise MediaError("file:// URLs must name a local path.", param=param)
            raw = unquote(parts.path)
        else:
            raw = url
        path = Path(raw)
        if "\x00" in raw or not path.is_absolute() or ".." in path.parts:
            raise MediaError("Local media paths must be absolute, without '..'.", param=param)
        try:
            # strict=True follows every symlink, so the containment check sees the real target.
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise MediaError("The local media file does not exist.", param=param) from None
        if not resolved.is_relative_to(Path(root).resolve()):
            raise MediaError("The local media path is outside the allowed directory.", param=param)
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise MediaError("The local media file cannot be read.", param=param) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MediaError("The local media path is not a regular file.", param=param)
            if info.st_size > max_bytes:
                raise _too_large(kind, max_bytes, param)
            file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with file:
            data = file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise _too_large(kind, max_bytes, param)
        return data


async def _read_capped(response: httpx.Response, kind: MediaKind, max_bytes: int, param: str | None) -> bytes:
    too_large = _too_large(kind, max_bytes, param)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    buf = bytearray()
    async for chunk in response.aiter_raw(_CHUNK):
        buf += chunk
        if len(buf) > max_bytes:
            raise too_large
    return bytes(buf)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _too_large(kind: MediaKind, max_bytes: int, param: str | None) -> MediaTooLargeError:
    return MediaTooLargeError(f"The {kind} is larger than the {max_bytes}-byte limit.", param=param)
