"""The load balancing processing unit (claim 4): algorithms, server configuration/state, service
acceptance control."""
