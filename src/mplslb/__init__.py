"""mplslb: a server load balancer that switches each client session on a pair of MPLS session labels."""

__version__ = "0.1.0"
