"""IP protocol numbers (IANA "Assigned Internet Protocol Numbers") shared by the IPv4 and IPv6 codecs."""

from __future__ import annotations

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60

IP_VERSION_4 = 4
IP_VERSION_6 = 6


def ip_version(buf: bytes | memoryview, offset: int = 0) -> int:
    """The version nibble at ``offset`` if it is 4 or 6, else 0 (also when ``offset`` is past the end)."""
    if not 0 <= offset < len(buf):
        return 0
    version = buf[offset] >> 4
    return version if version in (IP_VERSION_4, IP_VERSION_6) else 0
