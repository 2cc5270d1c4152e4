"""Which addresses the poster downloader may reach: public hosts only, and no redirect off the host asked.

A CSV's poster URLs are data from whoever made the CSV. Fetched blindly, `http://127.0.0.1:8080/admin`,
`http://169.254.169.254/` (cloud metadata) or a redirect to an intranet host would make the build machine a
proxy into its own network. So every address a connection actually goes to is checked *after* resolution
(a name that resolves to a private address is refused, and so is one re-resolved differently between a check
and the connect: the check is made on the very address connected to), and a redirect must keep the scheme and
the host of the URL it came from. `allow_private_hosts` lifts the address check (a local test server, a
trusted intranet mirror); the redirect rule always holds.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import urllib.request
from urllib.parse import urlparse


class RefusedURL(OSError):
    """A request the downloader will not make; the message says why (never anything the server sent)."""


def check_address(ip: str) -> None:
    """Raise RefusedURL unless `ip` is a public unicast address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    # is_global is False for private, loopback, link-local, shared (CGNAT), reserved and unspecified ranges;
    # multicast ranges count as global, so they are refused on their own
    if not addr.is_global or addr.is_multicast:
        raise RefusedURL(
            f"the host resolves to {addr}, a private, loopback, link-local, reserved or multicast address; "
            "posters are fetched from public hosts only (--allow-private-hosts to allow it)"
        )


def _resolve_checked(host: str, port: int) -> list[tuple]:
    """getaddrinfo for `host`, refused as a whole if any of its addresses is not public (a name that mixes a
    public and a private address could be made to pick the private one)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        check_address(info[4][0])
    return infos


def _connect_checked(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *args, **kwargs):
    """socket.create_connection, but only to the checked addresses of the name."""
    host, port = address[:2]
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in _resolve_checked(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            error = e
            sock.close()
    raise error or OSError(f"no address for {host!r}")


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_checked


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_checked  # TLS is wrapped around this socket, SNI still the name


def _proxied_target(req) -> tuple[str, int] | None:
    """The real (host, port) when `req` goes through a proxy, else None: the connection then goes to the proxy
    (which may well be private), so the target is checked by resolving it here instead."""
    tunnel = getattr(req, "_tunnel_host", None)
    if tunnel:
        host, _, port = tunnel.rpartition(":") if tunnel.count(":") == 1 else (tunnel, "", "")
        return host, int(port) if port.isdigit() else 443
    if req.has_proxy():
        url = urlparse(req.full_url)
        return url.hostname or "", url.port or 80
    return None


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        target = _proxied_target(req)
        if target:
            _resolve_checked(*target)
            return self.do_open(http.client.HTTPConnection, req)
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        target = _proxied_target(req)
        if target:
            _resolve_checked(*target)
        cls = http.client.HTTPSConnection if target else _CheckedHTTPSConnection
        kwargs = {"context": self._context}
        if hasattr(self, "_check_hostname"):  # gone in Python 3.12 (folded into the context)
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(cls, req, **kwargs)


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlparse(req.full_url), urlparse(newurl)
        if new.scheme.lower() != old.scheme.lower():
            problem = "another scheme"
        elif (new.hostname or "").lower() != (old.hostname or "").lower():
            problem = "another host"
        else:
            return super().redirect_request(req, fp, code, msg, headers, newurl)
        fp.close()  # urllib closes it only after a redirect it follows
        # the target is not quoted: it is the server's text, and the message ends up in the build report
        raise RefusedURL(f"the server redirected to {problem}; refused (a redirect is followed only on the same "
                         "host and scheme)")


@functools.lru_cache(maxsize=2)
def opener(allow_private_hosts: bool) -> urllib.request.OpenerDirector:
    """An opener with the redirect rule, and with the address check unless `allow_private_hosts`. Only http and
    https handlers exist in it: ftp:, file: and data: URLs cannot be opened, even by a redirect."""
    handlers = [urllib.request.ProxyHandler(), _SameHostRedirects()]
    if allow_private_hosts:
        handlers += [urllib.request.HTTPHandler(), urllib.request.HTTPSHandler()]
    else:
        handlers += [_CheckedHTTPHandler(), _CheckedHTTPSHandler()]
    director = urllib.request.OpenerDirector()
    # UnknownHandler: any other scheme is a URLError ("unknown url type"), not a silent None
    for h in handlers + [urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                         urllib.request.UnknownHandler()]:
        director.add_handler(h)
    return director
