"""A worker that serves nothing, for the supervisor's tests: it reads its options from stdin
as a real worker does, writes them where the test can read them, reports ready with made-up
addresses, and exits 0 on SIGTERM (or at once with GRAYSTEER_TEST_FAIL_START)."""

import json
import os
import pickle
import signal
import sys
import threading
from pathlib import Path

options = pickle.loads(sys.stdin.buffer.read())
if os.environ.get("GRAYSTEER_TEST_FAIL_START"):
    sys.exit(3)
out = Path(os.environ["GRAYSTEER_TEST_DIR"]) / f"worker-{options.worker_index}-{os.getpid()}.json"
# written whole, then renamed: the test polls the directory and must never read a half-written file
partial = out.with_suffix(".part")
partial.write_text(json.dumps({k: v for k, v in vars(options).items() if isinstance(v, str | int | None)}))
partial.rename(out)
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
print(f"ready ext_proc={options.listen} admin={options.admin_listen} authz_http=off", flush=True)
stopped.wait()
