"""A service's replicas as one fleet through etcd: leases, the leader, the replica records."""
