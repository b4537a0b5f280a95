r"""N processes on this machine as one jax cluster: what a multi-host run is.

  python -m qgjt_jax.launch_local --processes=2 --devices_per_process=2 -- \
      --config=configs/synthetic.py --workdir=runs/demo2x2

Every process runs `python -m qgjt_jax.main` with the flags after `--` and the
coordinator environment that `parallel.maybe_initialize_distributed` reads (a
free port on 127.0.0.1), on `--devices_per_process` CPU devices each, with
CPU collectives (gloo) so the processes really exchange gradients, as the
hosts of a TPU pod slice or the nodes of a GPU cluster do. This is how the
tests run the trainer on several hosts, and how to try a multi-host change on
a laptop.

Each process's output goes to WORKDIR/logs/process_I.log; process 0's is also
shown here. SIGINT and SIGTERM are passed on to every process (the children
run in their own session, so a Ctrl-C reaches them once, through here), and
they stop together with a checkpoint. The exit status is 0 when every process
exited 0; otherwise 1, after a line naming each process that failed and its
log. A process that dies makes the others stop within the heartbeat timeout
(`--heartbeat_timeout_s`); should one hang past it anyway, it is killed.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

from absl import app
from absl import flags

from qgjt_jax import errors
from qgjt_jax import parallel
from qgjt_jax import workdir as workdir_layout

# What the children inherit besides the cluster variables: fake CPU devices,
# and collectives that cross processes (without them, XLA's CPU client has
# none, and the first cross-process reduction fails).
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class LaunchError(errors.UserError, RuntimeError):
  """A launch that cannot start; the message says what to change."""


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def workdir_of(main_flags: Sequence[str]) -> str:
  """The --workdir among qgjt_jax.main's flags (both `=` and space forms)."""
  for i, flag in enumerate(main_flags):
    if flag.startswith("--workdir="):
      return flag.split("=", 1)[1]
    if flag == "--workdir" and i + 1 < len(main_flags):
      return main_flags[i + 1]
  raise LaunchError(
      "--workdir is missing from the qgjt_jax.main flags "
      "(after `--`): the processes share it, and their logs go "
      "to WORKDIR/logs."
  )


def child_environment(
    base: dict[str, str],
    *,
    process_id: int,
    num_processes: int,
    port: int,
    devices_per_process: int,
    heartbeat_timeout_s: int,
) -> dict[str, str]:
  """The environment of process `process_id` of the local cluster."""
  env = dict(base)
  xla_flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith(_DEVICE_COUNT_FLAG)
  ]
  xla_flags.append(f"{_DEVICE_COUNT_FLAG}={devices_per_process}")
  env.update(
      {
          "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
          "JAX_NUM_PROCESSES": str(num_processes),
          "JAX_PROCESS_ID": str(process_id),
          "JAX_PLATFORMS": "cpu",
          "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
          parallel.HEARTBEAT_ENV: str(heartbeat_timeout_s),
          "XLA_FLAGS": " ".join(xla_flags),
          "PYTHONUNBUFFERED": "1",
      }
  )
  return env


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with status {returncode}"


class _Process:
  """One child: its log file, and process 0's lines echoed to our stdout."""

  def __init__(
      self,
      index: int,
      command: list[str],
      env: dict[str, str],
      log_path: pathlib.Path,
      echo: bool,
  ):
    self.index, self.log_path = index, log_path
    self._log = open(log_path, "a", buffering=1)
    self.popen = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    self._echo = echo
    self._thread = threading.Thread(target=self._copy, daemon=True)
    self._thread.start()

  def _copy(self) -> None:
    for line in self.popen.stdout:
      self._log.write(line)
      if self._echo:
        sys.stdout.write(line)
        sys.stdout.flush()

  def finish(self) -> None:
    self._thread.join(timeout=30)
    self._log.close()


def launch(
    num_processes: int,
    devices_per_process: int,
    main_flags: Sequence[str],
    *,
    heartbeat_timeout_s: int = 60,
    python: str = sys.executable,
    port: Optional[int] = None,
) -> int:
  """Runs the cluster to the end; returns the exit status (0 or 1)."""
  if num_processes < 1 or devices_per_process < 1:
    raise LaunchError(
        f"--processes={num_processes} and --devices_per_process"
        f"={devices_per_process} must be at least 1."
    )
  workdir = workdir_of(main_flags)
  if "://" in workdir:
    raise LaunchError(
        f"--workdir={workdir}: a local cluster writes its logs "
        "beside the run; use a local folder."
    )
  layout = workdir_layout.Workdir(workdir)
  log_dir = layout.logs
  try:
    log_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise LaunchError(
        f"cannot create {log_dir} ({e.strerror}); use a writable --workdir."
    ) from None
  port = port or free_port()
  command = [python, "-m", "qgjt_jax.main", *main_flags]
  print(
      f"Starting {num_processes} process(es) x {devices_per_process} CPU "
      f"device(s), coordinator 127.0.0.1:{port}; logs in {log_dir}/.",
      flush=True,
  )
  processes = []
  for i in range(num_processes):
    env = child_environment(
        dict(os.environ),
        process_id=i,
        num_processes=num_processes,
        port=port,
        devices_per_process=devices_per_process,
        heartbeat_timeout_s=heartbeat_timeout_s,
    )
    processes.append(
        _Process(i, command, env, layout.process_log(i), echo=i == 0)
    )

  def forward(signum, frame):
    del frame
    for p in processes:
      if p.popen.poll() is None:
        p.popen.send_signal(signum)

  previous = {
      s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)
  }
  try:
    failures = _wait(processes, heartbeat_timeout_s)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for p in processes:
      p.finish()
  for p, message in failures:
    print(
        f"ERROR: process {p.index} {message} (log: {p.log_path}).",
        file=sys.stderr,
        flush=True,
    )
  return 1 if failures else 0


def _wait(
    processes: list[_Process], heartbeat_timeout_s: int
) -> list[tuple[_Process, str]]:
  """Waits for every child; kills those still running well after a failure.

  The survivors of a dead process stop by themselves once jax's coordination
  service misses its heartbeats; the grace period here only guards against
  a process stuck where that cannot reach it.
  """
  failures, first_failure = [], None
  grace = 2 * heartbeat_timeout_s + 30
  while True:
    running = 0
    for p in processes:
      code = p.popen.poll()
      if code is None:
        running += 1
      elif code != 0 and all(f[0] is not p for f in failures):
        message = _describe(code)
        if first_failure is None:
          first_failure = (p, time.monotonic())
        else:
          message += f" after process {first_failure[0].index} failed"
        failures.append((p, message))
    if not running:
      return failures
    if first_failure and time.monotonic() - first_failure[1] > grace:
      for p in processes:
        if p.popen.poll() is None:
          p.popen.kill()
          p.popen.wait()
          failures.append(
              (
                  p,
                  f"was still running {grace} s after process "
                  f"{first_failure[0].index} failed and was "
                  "killed",
              )
          )
      return failures
    time.sleep(0.2)


_PROCESSES = flags.DEFINE_integer(
    "processes", 2, "Processes of the cluster.", lower_bound=1
)
_DEVICES_PER_PROCESS = flags.DEFINE_integer(
    "devices_per_process", 1, "CPU devices of each process.", lower_bound=1
)
_HEARTBEAT_TIMEOUT_S = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    60,
    "How long the processes wait for a silent "
    "peer before stopping with an error.",
    lower_bound=1,
)
_PORT = flags.DEFINE_integer(
    "port",
    None,
    "Coordinator port (default: a free one).",
    lower_bound=1,
    upper_bound=65535,
)


def _parse_flags(argv: list[str]) -> list[str]:
  """Our flags before `--`; [program, qgjt_jax.main's flags after it]."""
  split = argv.index("--") if "--" in argv else len(argv)
  stray = errors.parse_flags(argv[:split])[1:]
  main_flags = argv[split + 1 :]
  if stray or not main_flags:
    sys.exit(
        "ERROR: give qgjt_jax.main's flags after `--`, e.g. "
        "--processes=2 -- --config=configs/synthetic.py "
        "--workdir=runs/demo"
        + (f" (unexpected before it: {' '.join(stray)})" if stray else "")
    )
  return [argv[0], *main_flags]


def main(argv: list[str]) -> int:
  """argv: [program, qgjt_jax.main's flags...] (`_parse_flags`)."""
  with errors.expected_failures():
    return launch(
        _PROCESSES.value,
        _DEVICES_PER_PROCESS.value,
        argv[1:],
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT_S.value,
        port=_PORT.value,
    )


def cli() -> None:
  """The `qgjt-launch-local` console script."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
