"""Kernel forwarding (nftables, conntrack) inside network namespaces the tests create."""
