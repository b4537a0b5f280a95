"""Launch scripts (dry runs print what they would run) and cluster detection."""

import json
import os
import shlex
import subprocess
import textwrap

import pytest

from qgjt_jax import parallel
from tests.helpers import tiny_runs

ROOT = str(tiny_runs.ROOT)
LAUNCH = os.path.join(ROOT, "launch")


def _dry_run(script, args, **env):
  clean = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("SLURM_", "JAX_", "TPU_", "PROCS_PER"))
  }
  clean.update(env)
  result = subprocess.run(
      ["bash", os.path.join(LAUNCH, script), *args],
      capture_output=True,
      text=True,
      timeout=60,
      cwd=ROOT,
      env=clean,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


MAIN_FLAGS = [
    "--config=configs/ms1m.py",
    "--workdir=gs://bucket/run 1",
    "--config.eval.bin_sets=('a.bin',)",
]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_tpu_pod_runs_the_same_command_on_every_worker(how):
  args = ["--tpu=pod-v4-32", "--zone=us-central2-b", "--project=proj"]
  env = {}
  if how == "env":
    env["DRY_RUN"] = "1"
  else:
    args.append("--dry_run")
  commands = _dry_run("tpu_pod.sh", args + ["--"] + MAIN_FLAGS, **env)
  assert len(commands) == 1
  argv = commands[0]
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4-32"]
  assert "--worker=all" in argv
  assert _flag(argv, "--zone") == "us-central2-b"
  assert _flag(argv, "--project") == "proj"
  remote = shlex.split(_flag(argv, "--command"))
  # What each worker's shell runs: cd, then one process with the flags intact.
  assert remote[:3] == ["cd", "~/qgjt_jax", "&&"]
  assert remote[3:6] == ["QGJT_DISTRIBUTED=1", "python3", "-m"]
  assert remote[6] == "qgjt_jax.main"
  assert remote[7:] == MAIN_FLAGS


def test_tpu_pod_setup_copies_and_installs_on_every_worker():
  commands = _dry_run(
      "tpu_pod.sh",
      ["--tpu=t", "--zone=z", "--setup", "--dry_run", "--", *MAIN_FLAGS],
  )
  assert len(commands) == 4
  verbs = [c[4] for c in commands]
  assert verbs == ["ssh", "scp", "ssh", "ssh"]
  assert all("--worker=all" in c for c in commands)
  scp = commands[1]
  assert "--recurse" in scp and "t:~/qgjt_jax/" in scp
  assert any(p.endswith("/qgjt_jax") for p in scp)
  install = _flag(commands[2], "--command")
  assert "jax[tpu]" in install and "pip install -q -e ." in install


def test_tpu_pod_refuses_missing_arguments():
  result = subprocess.run(
      [
          "bash",
          os.path.join(LAUNCH, "tpu_pod.sh"),
          "--dry_run",
          "--",
          *MAIN_FLAGS,
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env={"PATH": os.environ["PATH"]},
  )
  assert result.returncode == 2 and "usage" in result.stderr


def _srun(lines):
  exports = {}
  srun = None
  for argv in lines:
    if argv[0] == "export":
      key, value = argv[1].split("=", 1)
      exports[key] = value
    elif argv[0] == "srun":
      srun = argv
  assert srun is not None, lines
  return exports, srun


def test_slurm_one_process_per_node_sees_all_its_gpus():
  lines = _dry_run(
      "slurm_gpu.sbatch",
      MAIN_FLAGS,
      DRY_RUN="1",
      SLURM_JOB_NODELIST="gpu[017-020],gpu033",
      SLURM_JOB_NUM_NODES="5",
      SLURM_JOB_ID="4242",
      GPUS_PER_NODE="8",
  )
  exports, srun = _srun(lines)
  assert exports["JAX_COORDINATOR_ADDRESS"] == f"gpu017:{12345 + 242}"
  assert exports["JAX_NUM_PROCESSES"] == "5"
  assert _flag(srun, "--nodes") == "5"
  assert _flag(srun, "--ntasks-per-node") == "1"
  assert srun[-3:-1] == ["bash", "-c"]
  task = srun[-1]
  assert "JAX_PROCESS_ID=$SLURM_PROCID" in task
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7;" in task
  main = shlex.split(task.split("exec ", 1)[1])
  assert main[:3] == ["python3", "-m", "qgjt_jax.main"]
  assert main[3:] == MAIN_FLAGS


def test_slurm_one_process_per_gpu():
  lines = _dry_run(
      "slurm_gpu.sbatch",
      ["--dry_run", *MAIN_FLAGS],
      PROCS_PER="gpu",
      SLURM_JOB_NODELIST="a1,a2",
      SLURM_JOB_NUM_NODES="2",
      SLURM_JOB_ID="7",
      GPUS_PER_NODE="4",
      COORD_PORT="23456",
  )
  exports, srun = _srun(lines)
  assert exports["JAX_COORDINATOR_ADDRESS"] == "a1:23456"
  assert exports["JAX_NUM_PROCESSES"] == "8"
  assert _flag(srun, "--ntasks-per-node") == "4"
  assert "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID;" in srun[-1]


def test_gpu_bench_runs_the_yardstick_and_three_benchmarks():
  commands = _dry_run(
      "gpu_bench.sh", [], DRY_RUN="1", STAGES="core", CALIB="calib_step.py"
  )
  assert commands[0] == ["python3", "calib_step.py", "--arch=50", "--batch=512"]
  bench = [c[3:] for c in commands[1:]]
  assert all(c[1:3] == ["-m", "qgjt_jax.bench"] for c in commands[1:])
  assert bench == [
      ["--config.global_batch_size=256"],
      ["--config.global_batch_size=256", "--no_qgface"],
      ["--config.global_batch_size=256", "--config.model.name=ir100"],
  ]


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}, {}),
        (
            {
                "SLURM_JOB_ID": "1",
                "SLURM_NTASKS": "16",
                "QGJT_DISTRIBUTED": "0",
            },
            None,
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3",
            },
            {"num_processes": 4, "process_id": 3},
        ),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "1",
                "JAX_PROCESS_ID": "0",
            },
            None,
        ),
        ({"OMPI_COMM_WORLD_SIZE": "8"}, {}),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
        ({"QGJT_DISTRIBUTED": "1"}, {}),
    ],
)
def test_detect_cluster(environ, expected):
  assert parallel.detect_cluster(environ) == expected


def test_single_process_does_not_start_distributed():
  assert parallel.maybe_initialize_distributed({}) is False


def test_gpu_bench_collects_json_lines_and_survives_a_failure(tmp_path):
  # A stand-in interpreter: prints a JSON line naming its arguments, except
  # for IR-100, which fails.
  fake = tmp_path / "python3"
  fake.write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      case "$*" in
        *import*) echo versions; exit 0 ;;
        *ir100*) echo "out of memory" >&2; exit 3 ;;
      esac
      echo "some log line"
      echo "{\\"args\\": \\"$*\\"}"
      """))
  fake.chmod(0o755)
  out = tmp_path / "out"
  out.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
  env.update(
      PYTHON=str(fake),
      OUT=str(out),
      STAGES="core",
      CALIB="calib_step.py",
      PATH=os.environ["PATH"],
  )
  result = subprocess.run(
      ["bash", os.path.join(LAUNCH, "gpu_bench.sh")],
      capture_output=True,
      text=True,
      timeout=60,
      cwd=ROOT,
      env=env,
  )
  assert result.returncode == 0, result.stderr
  printed = [
      json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")
  ]
  saved = [
      json.loads(l) for l in (out / "bench.jsonl").read_text().splitlines()
  ]
  assert printed == saved and len(saved) == 4
  assert saved[0]["args"] == "calib_step.py --arch=50 --batch=512"
  assert saved[2]["args"].endswith("--config.global_batch_size=256 --no_qgface")
  assert saved[3] == {"failed": "qgface_ir100", "rc": 3}
  assert "out of memory" in (out / "bench.log").read_text()


def test_gpu_bench_prepares_what_a_bare_device_checkout_lacks():
  commands = _dry_run("gpu_bench.sh", ["--prepare"], DRY_RUN="1")
  assert ["mkdir", "-p", ".carry/wheels"] in commands
  assert [
      "cp",
      "../shared/bench/calib_step.py",
      ".carry/calib_step.py",
  ] in commands
  (download,) = [c for c in commands if "download" in c]
  assert download[1:4] == ["-m", "pip", "download"]
  assert "--python-version" in download and download[-2:] == [
      "ml_collections",
      "pyyaml",
  ]
  assert download[download.index("-d") + 1] == ".carry/wheels"
