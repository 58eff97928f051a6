import sys

from sidecar.cli import main

if __name__ == "__main__":  # not when a worker process of multiprocessing imports it
    sys.exit(main())
