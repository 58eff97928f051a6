"""One worker of `graysteer serve --workers N`: its options object arrives pickled on stdin
from the supervisor (sidecar.serving.workers), its own process, never as flags."""

import logging
import pickle
import sys

from sidecar.serving.options import ServeOptions
from sidecar.serving.run import run_event_loop, serve


def main() -> int:
    options = pickle.loads(sys.stdin.buffer.read())  # from the supervisor, our parent
    if not isinstance(options, ServeOptions):
        print("graysteer worker: expected serve options on stdin", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=options.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [worker {options.worker_index}] %(name)s: %(message)s",
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    try:
        run_event_loop(serve(options), options.event_loop)
    except (OSError, ValueError) as error:
        print(f"graysteer worker {options.worker_index}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
