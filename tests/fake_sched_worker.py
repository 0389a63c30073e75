"""A stand-in for ``python -m torch_r1attn.schedule worker``: speaks the same protocol, searches
nothing. Standard library only, so a worker starts in ~50 ms and timing tests measure the
scheduler, not ``import torch``.

Behaviour is set through the environment (comma-separated label lists):

``FAKE_SLEEP_S``            seconds per job (default 0.05)
``FAKE_STATE_DIR``          where to append ``attempts.log`` lines ("label cvd pid") and pid files
``FAKE_SLOW``               "label:seconds,..." per-label job time instead of FAKE_SLEEP_S
``FAKE_CRASH_ONCE``         labels whose first attempt (across all workers) exits with code 3
``FAKE_CRASH_ALWAYS``       labels that SIGKILL the worker on every attempt
``FAKE_HANG``               labels that never finish
``FAKE_NEGATIVE``           labels reported as ``negative``
``FAKE_FATAL_CVD``          CUDA_VISIBLE_DEVICES values on which startup reports ``fatal``
``FAKE_DIE_AT_START_CVD``   CUDA_VISIBLE_DEVICES values on which the worker exits before hello
``FAKE_JUNK``               "1": write non-protocol lines to stdout before hello
``FAKE_GRANDCHILD``         "1": start a long ``sleep`` grandchild (its pid goes in the state dir)

Each result's ``winner`` records what the worker saw: ``cvd=<CUDA_VISIBLE_DEVICES> interp=<TRITON_INTERPRET>
budget=<R1ATTN_BUDGET_S> label=<label>``.
"""

import json
import os
import signal
import subprocess
import sys
import time


def _labels(name):
    return {x for x in os.environ.get(name, "").split(",") if x}


def _state(name):
    d = os.environ.get("FAKE_STATE_DIR")
    return os.path.join(d, name) if d else None


def _append(name, text):
    path = _state(name)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def _first_time(label):
    path = _state(f"crashed-once-{label}")
    if path is None:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def send(msg):
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main():
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    _append("pids.log", f"worker {os.getpid()}")
    if os.environ.get("FAKE_GRANDCHILD") == "1":
        child = subprocess.Popen(["sleep", "60"])
        _append("pids.log", f"grandchild {child.pid}")
    if cvd in _labels("FAKE_DIE_AT_START_CVD"):
        sys.stderr.write("fake worker: dying before hello\n")
        return 5
    if cvd in _labels("FAKE_FATAL_CVD"):
        send({"type": "fatal", "error": f"fake fatal on cvd {cvd}"})
        return 1
    if os.environ.get("FAKE_JUNK") == "1":
        sys.stdout.write("this is not json\n[1, 2]\n")
        sys.stdout.flush()
    send({"type": "hello", "protocol": 1, "pid": os.getpid(), "device": f"fake-{cvd}"})
    sleep_s = float(os.environ.get("FAKE_SLEEP_S", "0.05"))
    for line in sys.stdin:
        msg = json.loads(line)
        label = msg["label"]
        _append("attempts.log", f"{label} {cvd} {os.getpid()}")
        if label in _labels("FAKE_CRASH_ALWAYS"):
            os.kill(os.getpid(), signal.SIGKILL)
        if label in _labels("FAKE_CRASH_ONCE") and _first_time(label):
            sys.stderr.write(f"fake worker: crashing on {label}\n")
            sys.stderr.flush()
            os._exit(3)
        if label in _labels("FAKE_HANG"):
            time.sleep(3600)
        slow = dict(x.split(":") for x in _labels("FAKE_SLOW"))
        time.sleep(float(slow.get(label, sleep_s)))
        path = msg.get("tensors_path")
        if path is not None and not os.path.exists(path):
            send({"type": "result", "id": msg["id"], "status": "failed", "error": f"missing {path}"})
            continue
        status = "negative" if label in _labels("FAKE_NEGATIVE") else "kernel"
        winner = (f"cvd={cvd} interp={os.environ.get('TRITON_INTERPRET', '<unset>')} "
                  f"budget={os.environ.get('R1ATTN_BUDGET_S', '<unset>')} label={label}")
        send({"type": "result", "id": msg["id"], "status": status,
              "speedup": 1.5 if status == "kernel" else 0.9, "best_baseline": "sdpa_flash",
              "winner": winner if status == "kernel" else None, "error": None,
              "spec_uri": msg["spec"]["uri"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
