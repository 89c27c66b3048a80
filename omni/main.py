"""Entry point: `python -m omni.main --config=configs/NAME.py [--config.KEY=VALUE ...] [--workdir=DIR]`.

Validates the config before anything compiles, then runs config.stage in the workdir (default runs/NAME);
rerunning with the same workdir resumes from its latest checkpoint.

Many hosts: every process runs the same command. With config.distributed.coordinator=HOST:PORT (plus
num_processes and process_id) the processes meet there; with it empty they are found from a cluster launcher
(SLURM srun or Open MPI mpirun with several tasks, a Cloud TPU VM), or this is the only process. Only process
0 prints and writes metrics; checkpoints are written by all of them together.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from omni import config as config_lib
from omni import aot, estimate, parallel
from omni.data import DataError
from omni.generate import GenerationError
from omni.stages import registry
from omni.train import checkpoint, trainer
from omni.workdir import Workdir, WorkdirError

config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory; default runs/NAME.")
FLAGS = flags.FLAGS


def config_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def dry_run(config) -> None:
    """Validate against the config's own mesh (the target slice), print size and memory, allocate nothing.
    The stage's step is then compiled ahead of time for config.topology's TPU chips (libtpu), or for this
    host's devices where the mesh fits them, and the compiler's own per-device memory and FLOPs printed."""
    target = slice_ = None
    if config.topology:
        slice_ = aot.parse_topology(config.topology)
        num_slices = config.mesh.dcn_data * config.mesh.dcn_fsdp
        devices = slice_.chips * num_slices
    else:
        sizes = dict(config.mesh)
        devices = math.prod(sizes.values()) if -1 not in sizes.values() else jax.device_count()
    config = registry.validate(config, devices)
    est = registry.estimate(config)
    print(estimate.report(est), flush=True)
    if slice_ is not None:
        target = aot.topology_devices(slice_, num_slices)
    elif devices == jax.device_count():
        target = jax.devices()
    if target is not None and registry.get(config.stage).step is not None:  # a tool stage has no train step
        est["compiled"] = aot.compiled_report(config, target, est, slice_)
        print("\n".join("  " + line for line in aot.report_lines(est["compiled"])))
    print(json.dumps(est))


def _cluster_launcher() -> str | None:
    """The launcher that started this process as one of several, if any; JAX then finds the coordinator, the
    process count and this process's id from it. Only these: jax.distributed.initialize() alone would also take
    any Kubernetes pod, or a one-task SLURM allocation, for a cluster and wait for peers that never come."""
    # The step's own task count: a batch script's python (one process) also sees the job's SLURM_NTASKS.
    if "SLURM_STEP_NODELIST" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    from jax._src import cloud_tpu_init  # set on `import jax` from the PCI bus: no network, no backend

    # On a TPU VM JAX reads the slice's workers from the metadata server; a one-host slice is one process.
    return "Cloud TPU" if cloud_tpu_init.running_in_cloud_tpu_vm else None


def _check_distributed(d) -> None:
    host, _, port = d.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise config_lib.ConfigError(f"config.distributed.coordinator={d.coordinator!r}: expected HOST:PORT")
    if not isinstance(d.num_processes, int) or d.num_processes < 1:
        raise config_lib.ConfigError(f"config.distributed.num_processes={d.num_processes!r}: must be >= 1")
    if not isinstance(d.process_id, int) or not 0 <= d.process_id < d.num_processes:
        raise config_lib.ConfigError(f"config.distributed.process_id={d.process_id!r}: must be in [0, "
                                     f"config.distributed.num_processes={d.num_processes})")


def init_distributed(config) -> None:
    """Joins the other processes of a multi-host run; must come before anything else uses JAX."""
    d = config.distributed
    if d.coordinator:
        _check_distributed(d)
        args, where = dict(coordinator_address=d.coordinator, num_processes=d.num_processes,
                           process_id=d.process_id), f"config.distributed.coordinator={d.coordinator!r}"
    elif d.num_processes != 1:
        raise config_lib.ConfigError(f"config.distributed.num_processes={d.num_processes!r} needs "
                                     "config.distributed.coordinator=HOST:PORT (and process_id)")
    elif launcher := _cluster_launcher():
        args, where = {}, f"config.distributed.coordinator='' (found by {launcher})"
    else:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes exchange arrays over gloo
    try:
        jax.distributed.initialize(**args)
    except Exception as e:  # noqa: BLE001 - whatever JAX raises, the user must fix the same keys
        raise config_lib.ConfigError(f"{where}: cannot join the other processes: {type(e).__name__}: {e}") from e
    if jax.process_index() != 0:  # one process speaks for the run (Python and C++ alike); stderr stays
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def check_devices(config) -> None:
    """A mesh sized for other devices (a config's TPU slice, run on a laptop) stops here, before anything is
    built, saying what it needs and what this host has."""
    sizes = dict(config.mesh)
    if -1 in sizes.values() or math.prod(sizes.values()) == jax.device_count():
        return
    needs = f"config.mesh needs {math.prod(sizes.values())} devices"
    if config.topology:
        needs += f" (the TPU {aot.parse_topology(config.topology).name} of config.topology={config.topology!r})"
    try:
        est = registry.estimate(registry.validate(config, math.prod(sizes.values())))
        needs += f" with ~{est['total_gib_per_device']:.1f} GiB each"
    except config_lib.ConfigError:
        pass  # the mesh's own device count is the news; validate names other keys once the mesh fits
    device = jax.devices()[0]
    have = parallel.device_memory_bytes(device)
    raise trainer.DoesNotFit(f"{needs}; this host has {jax.device_count()} {device.platform} device(s)"
                             + (f" of {have / 2 ** 30:.1f} GiB" if have else ""))


def check_state_fits(config) -> None:
    """Parameters and optimizer state alone (the estimate's sure part) must fit the devices: found before a
    stage loads its models or data; the compiled step's own numbers are checked again before allocating."""
    device = jax.local_devices()[0]
    have = parallel.device_memory_bytes(device)
    need = registry.estimate(config)["train_state_gib_per_device"] * 2 ** 30
    if have and need > have and not config.force:
        raise trainer.DoesNotFit(f"parameters and optimizer state alone need ~{need / 2 ** 30:.1f} GiB per device, "
                                 f"and this host's {device.platform} devices have {have / 2 ** 30:.1f} GiB each "
                                 "(--config.force=True tries anyway)")


def run(config, workdir: str) -> int:
    stage = registry.get(config.stage)
    if config.init_from and stage.trains:  # a stage continues the model it starts from
        source, _, _ = Workdir(config.init_from).meta()
        config = config_lib.inherit_architecture(config, source)
    if config.dry_run:
        dry_run(config)
        return 0
    if stage.trains:
        check_devices(config)
    config = registry.validate(config, jax.device_count())
    if stage.trains:
        check_state_fits(config)
    with Workdir(workdir).hold(config) as run:
        if not stage.trains:  # reads a trained workdir and writes this one
            stage.start(config, workdir)
            if jax.process_index() == 0 and run.saved_config() is None:  # what it was made by: reruns are checked
                run.write_config(config)
            return 0
        return train(config, run, stage)


def train(config, workdir: Workdir, stage: registry.Stage) -> int:
    start = time.time()  # the stage's setup too (DPO's reference, best-of-n's sampling): the time a user waits
    task = stage.start(config, workdir.path)
    summary = trainer.train(config, workdir.path, task)  # writes config.json once training starts
    if "preempted" in summary:
        return 0
    summary["wall_s"] = time.time() - start
    if jax.process_index() == 0:
        workdir.write_summary(summary)
        print(json.dumps(summary), flush=True)
        if "unigram_perplexity" in summary and "eval_perplexity" in summary:
            print(f"held-out perplexity {summary['eval_perplexity']:.2f} (unigram baseline "
                  f"{summary['unigram_perplexity']:.2f}); {summary['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {summary['mfu']:.1%}, {summary['wall_s']:.0f} s; workdir {workdir.path}", flush=True)
    return 0


class Stopped(Exception):
    """SIGTERM or SIGINT outside the training loop (start-up, compilation): the run ends, exit 0."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag, config file or config key reported in one line (not a traceback)."""
    try:
        rest = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.get("stage")  # a config file that failed to load raises only when read
        return rest
    except Exception as e:  # noqa: BLE001 - config_flags raises whatever the config file or override raised
        print(f"error: {_flag_error(argv, e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def _flag_error(argv: list[str], e: Exception) -> str:
    text = str(e).replace("\\n", " ").replace("\n", " ")
    if isinstance(e, (AttributeError, KeyError)):  # an override naming a key the config lacks
        key = re.search(r"'(\w+)", text)
        flag = next((a.split("=")[0] for a in argv if key and a.startswith("--config.")
                     and key.group(1) in a.split("=")[0].split(".")[1:]), "--config.KEY")
        hint = re.search(r'Did you mean "(\w+)"', text)
        return f"{flag}: no such config key" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
    if isinstance(e, OSError):
        config = next((a for a in argv if a.startswith("--config=")), "--config")
        return f"{config}: cannot load the config file ({text.rsplit(':', 1)[-1].strip()})"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def default_workdir(config) -> str:
    """runs/NAME; an evaluation is named after what it evaluates (runs/eval_SOURCE), so each keeps its own."""
    if config.stage == "eval" and config.init_from:
        return os.path.join("runs", f"{config.name}_{os.path.basename(os.path.normpath(config.init_from))}")
    return os.path.join("runs", config.name)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    logging.set_verbosity(logging.WARNING)  # keep Orbax's and JAX's INFO chatter out of the run's output
    config = FLAGS.config
    config.name = config_name(config_flags.get_config_filename(FLAGS["config"]))
    workdir = FLAGS.workdir or default_workdir(config)
    try:
        if config.stage in ("pipeline", "post_training"):  # stages in subprocesses; never touches the devices
            from omni import pipeline

            sys.exit(pipeline.run(config, workdir))
        for signum in (signal.SIGTERM, signal.SIGINT):  # the trainer takes them over while it trains
            signal.signal(signum, _stop)
        parallel.split_cpu_host(config_lib.cpu_devices(config))
        if not config.dry_run:  # a dry run allocates nothing and needs no other host
            init_distributed(config)
        sys.exit(run(config, workdir))
    except (config_lib.ConfigError, DataError, checkpoint.CheckpointError, GenerationError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except trainer.DoesNotFit as e:
        command = " ".join(["python -m omni.main", *map(shlex.quote, sys.argv[1:]), "--config.dry_run=True"])
        print(f"error: {e}; nothing was allocated. Size it without allocating: {command}", file=sys.stderr,
              flush=True)
        sys.exit(2)
    except trainer.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Stopped as e:
        print(f"stopped by {e} (not while training: nothing of this run was saved); rerun the same command to "
              "go on", flush=True)
        sys.exit(0)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
