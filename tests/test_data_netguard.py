"""mmgcs/data/netguard.py: which addresses the poster downloader may reach. Loopback, private, link-local (cloud
metadata), shared, multicast and reserved addresses are refused, IPv4 and IPv6 alike; public ones pass (the
downloader's refusals over HTTP: tests/test_data_download.py)."""

from __future__ import annotations

import pytest

from mmgcs.data.netguard import RefusedURL, check_address


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "fe80::1%eth0",
                                "fc00::1", "ff02::1", "::ffff:10.0.0.1"])
def test_non_public_addresses_are_refused(ip):
    with pytest.raises(RefusedURL, match="public hosts only"):
        check_address(ip)


@pytest.mark.parametrize("ip", ["93.184.216.34", "2606:4700::6810:84e5"])
def test_public_addresses_pass(ip):
    check_address(ip)
