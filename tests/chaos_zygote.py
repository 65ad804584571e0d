"""A fork server for the crash tests: imports tunesmith's heavy dependencies once, then for each
JSON line on stdin forks a child that runs the real `tunesmith` CLI with the given arguments and
environment, SIGKILLs it after `kill_after` seconds if asked, and prints one JSON line with how
the child ended. Forking a warm interpreter makes each of a dozen runs cost seconds, not the
~9 s of importing torch, transformers and peft afresh; the parent never computes, so the
children start with no thread pools to inherit."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import accelerate  # noqa: F401  (warm imports for the children)
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

import tunesmith.api  # noqa: F401
from tunesmith.cli import app


def child(job: dict) -> None:
    os.environ.update(job.get("env", {}))
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        app(job["args"], prog_name="tunesmith")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(job)
        if job.get("kill_after") is not None:
            deadline = started + job["kill_after"]
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.01)
            else:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
        else:
            _, status = os.waitpid(pid, 0)
        result = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        print(json.dumps({**result, "seconds": round(time.monotonic() - started, 2)}), flush=True)


if __name__ == "__main__":
    main()
