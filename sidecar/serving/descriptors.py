"""The process's open-file limit, raised before serving.

Every connection Envoy's pool opens to the HTTP transport is a descriptor, and the HTTP
server caps its connections below the soft RLIMIT_NOFILE (sidecar.transports.authz_http
`connection_cap`). A shell's default soft limit, 1,024, would put that cap near 900: under
Envoy's own default circuit breaker for the sidecar cluster (1,024 requests), so a burst of
checks would find the sidecar refusing connections before Envoy queues them. The soft limit
is raised to the hard one, as Go programs do at start and Envoy's deployment docs ask for.
"""

import logging
import resource

log = logging.getLogger("graysteer.serve")

# When the hard limit is unlimited: the kernel refuses an unlimited soft one (fs.nr_open).
UNLIMITED_SOFT = 1 << 20


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit in effect. Never fails:
    a refused raise keeps the limit as it was, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNLIMITED_SOFT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as error:
            log.warning("open file limit stays at %d (raising it to %d failed: %s)", soft, wanted, error)
            return soft
        return wanted
    return soft
