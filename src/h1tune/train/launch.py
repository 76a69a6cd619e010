"""`h1tune train CONFIG --nproc N`: the same run on N processes per node, started by `accelerate launch`.

    h1tune train run.yaml --nproc 8                                     # one node, 8 GPUs
    h1tune train run.yaml --nproc 8 --nnodes 4 --node-rank $SLURM_NODEID \\
        --master-addr $HEAD_NODE --master-port 29500                     # once on every node

h1tune builds one `accelerate launch` command for `training.distributed` (its accelerate config ships
in h1tune/resources/accelerate/) and hands it to a launcher: subprocess by default; tests pass their
own and check the exact argv. Each process then runs `python -m h1tune.cli train CONFIG` itself,
exactly as under the user's own `accelerate launch -m h1tune.cli train ...` or `torchrun -m h1tune.cli
train ...`; h1tune does no process management of its own.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from h1tune.config import H1tuneConfig
from h1tune.errors import ConfigError, H1tuneError
from h1tune.train.strategies import NEEDS_CUDA, accelerate_config, deepspeed_config

log = logging.getLogger("h1tune")

Launcher = Callable[[list[str]], int]
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE")  # set by torchrun / accelerate in every process


@dataclass(frozen=True)
class Topology:
    """Where the processes run: `nproc` per node on `nnodes` nodes; this node is `node_rank`."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def problems(self) -> list[str]:
        found = []
        if self.nproc < 1:
            found.append(f"--nproc: must be >= 1 (processes on this node, one per GPU), got {self.nproc}")
        if self.nnodes < 1:
            found.append(f"--nnodes: must be >= 1, got {self.nnodes}")
        elif not 0 <= self.node_rank < self.nnodes:
            found.append(f"--node-rank: must be in 0..{self.nnodes - 1} (this node's index), got {self.node_rank}")
        if self.nnodes > 1 and not self.master_addr:
            found.append("--master-addr: required with --nnodes > 1 (the address of node 0, which all nodes reach); "
                         "under SLURM: the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            found.append(f"--master-port: must be a TCP port (1-65535), got {self.master_port}")
        return found


def train_arguments(overrides: Sequence[str], overwrite: bool = False, resume: bool | str = False) -> list[str]:
    """The `h1tune train` options every process gets (all but the launch options)."""
    args = [part for item in overrides for part in ("--set", item)]
    if overwrite:
        args.append("--overwrite")
    if resume is True:
        args.append("--resume")
    elif resume:
        args += ["--resume", str(resume)]
    return args


def launch_argv(config_path: str, cfg: H1tuneConfig, topology: Topology, train_args: Sequence[str] = (),
                python: str = sys.executable) -> list[str]:
    """The `accelerate launch` command (this interpreter's accelerate) that runs the config on every process.

    `--num_processes` is accelerate's total over all nodes; accelerate starts `nproc` per node.
    """
    strategy = cfg.training.distributed
    argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(strategy)),
            "--num_processes", str(topology.world_size), "--num_machines", str(topology.nnodes),
            "--machine_rank", str(topology.node_rank)]
    if topology.master_addr:
        argv += ["--main_process_ip", topology.master_addr]
    if topology.master_port is not None:
        argv += ["--main_process_port", str(topology.master_port)]
    if strategy == "fsdp":  # FSDP's own checkpointing replaces the model's (strategies.fsdp_settings)
        # auto: the memory estimate runs per process after launch; FSDP jobs are the large ones, so checkpoint
        argv += ["--fsdp_activation_checkpointing", str(cfg.training.gradient_checkpointing is not False).lower()]
    if deepspeed_config(strategy) is not None:
        argv += ["--deepspeed_config_file", str(deepspeed_config(strategy))]
    return argv + ["-m", "h1tune.cli", "train", str(config_path), *train_args]


def needs_launch(cfg: H1tuneConfig, topology: Topology) -> bool:
    """One process of plain data parallelism is just a run: no launcher (accelerate refuses one DDP process)."""
    return topology.world_size > 1 or cfg.training.distributed in NEEDS_CUDA


def check_launchable(cfg: H1tuneConfig, topology: Topology, environ: dict | None = None) -> None:
    """Every reason the launch would fail at once, before any process starts."""
    import torch

    environ = os.environ if environ is None else environ
    problems = topology.problems()
    inside = [name for name in LAUNCHER_VARIABLES if name in environ]
    if inside:
        problems.append(f"--nproc: this process already runs under a launcher ({inside[0]}={environ[inside[0]]}); "
                        "drop --nproc, the launcher started the processes")
    cp_size = cfg.training.context_parallel
    if topology.world_size % cp_size:
        problems.append(f"--nproc: {topology.world_size} process(es) in all cannot form groups of "
                        f"training.context_parallel ({cp_size}); use a multiple of it")
    strategy = cfg.training.distributed
    if strategy in NEEDS_CUDA and not torch.cuda.is_available():
        problems.append(f"training.distributed: {strategy!r} needs CUDA GPUs (accelerate runs FSDP and DeepSpeed on "
                        "GPUs only); on CPUs use ddp")
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(f"training.distributed: {strategy!r} needs DeepSpeed: `pip install deepspeed` "
                        "(built for your CUDA), or choose fsdp")
    if problems:
        raise ConfigError(problems)


def launch(config_path: str, cfg: H1tuneConfig, topology: Topology, train_args: Sequence[str] = (),
           launcher: Launcher | None = None) -> int:
    """Check, then run the launch command with `launcher` (default: a subprocess); its exit code."""
    check_launchable(cfg, topology)
    argv = launch_argv(config_path, cfg, topology, train_args)
    log.info("launching %d process(es) on this node (%d in all, strategy %s): %s", topology.nproc,
             topology.world_size, cfg.training.distributed, shlex.join(argv))
    return (launcher or subprocess.call)(argv)


def launch_from_cli(args, cfg: H1tuneConfig, launcher: Launcher | None = None) -> int | None:
    """`h1tune train ... --nproc N`: the launch's exit code, or None when this process should simply train."""
    if args.nproc is None:
        given = [flag for flag, value, default in (("--nnodes", args.nnodes, 1), ("--node-rank", args.node_rank, 0),
                 ("--master-addr", args.master_addr, None), ("--master-port", args.master_port, None))
                 if value != default]
        problems = [f"{flag}: launches several processes, so it needs --nproc N (processes per node)" for flag in given]
        cp_size = cfg.training.context_parallel
        if cp_size > 1 and "WORLD_SIZE" not in os.environ:  # not one of the launched processes either
            problems.append(f"training.context_parallel: {cp_size} ranks share each row, so the run needs "
                            f"processes: h1tune train CONFIG --nproc {cp_size} (or a multiple)")
        if problems:
            raise ConfigError(problems)
        return None
    topology = Topology(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if not needs_launch(cfg, topology):
        if topology.problems():
            raise ConfigError(topology.problems())
        return None
    train_args = train_arguments(args.overrides, overwrite=args.overwrite, resume=args.resume)
    code = launch(args.config, cfg, topology, train_args, launcher)
    if code != 0:
        raise H1tuneError(f"the launched training exited with code {code}; the messages above are the processes' "
                          "own. Rerun the same command to resume from the last complete checkpoint")
    return 0
