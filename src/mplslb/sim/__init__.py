"""The in-memory simulated network: clients, the balancer, servers, in one process and simulated time."""
