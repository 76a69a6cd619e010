"""`h1tune train CONFIG --nproc N`: the exact `accelerate launch` argv for each strategy and for two
nodes, read back by accelerate 1.15's own parser; launch refusals; the CLI hands the argv to the
launcher and does not train in its own process."""

import sys

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from h1tune import cli
from h1tune.config import config_from_dict
from h1tune.errors import ConfigError
from h1tune.train import launch as launch_mod
from h1tune.train.launch import Topology, check_launchable, launch, launch_argv, needs_launch, train_arguments
from h1tune.train.strategies import resource

PY = sys.executable
ONE_NODE = Topology(nproc=4)
TWO_NODES = Topology(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)


def cfg(strategy: str, **training):
    return config_from_dict({"training": {"distributed": strategy, **training}})


def head(config_file: str, processes: int, machines: int = 1, rank: int = 0) -> list[str]:
    return [PY, "-m", "accelerate.commands.launch", "--config_file", str(resource(config_file)),
            "--num_processes", str(processes), "--num_machines", str(machines), "--machine_rank", str(rank)]


TAIL = ["-m", "h1tune.cli", "train", "run.yaml", "--set", "training.seed=3", "--overwrite"]


@pytest.mark.parametrize("strategy, extra", [
    ("none", []),
    ("ddp", []),
    ("fsdp", ["--fsdp_activation_checkpointing", "false"]),
    ("deepspeed_zero2", ["--deepspeed_config_file", str(resource("zero2.json"))]),
    ("deepspeed_zero3", ["--deepspeed_config_file", str(resource("zero3.json"))]),
])
def test_one_node_argv_per_strategy(strategy, extra):
    config_file = {"none": "ddp.yaml", "ddp": "ddp.yaml", "fsdp": "fsdp.yaml"}.get(strategy, "deepspeed.yaml")
    config = cfg(strategy, gradient_checkpointing=False)
    argv = launch_argv("run.yaml", config, ONE_NODE, train_arguments(["training.seed=3"], overwrite=True))
    assert argv == head(config_file, 4) + extra + TAIL


def test_two_node_argv_counts_all_processes_and_names_the_master():
    argv = launch_argv("run.yaml", cfg("fsdp", gradient_checkpointing=True), TWO_NODES, ["--resume"])
    assert argv == head("fsdp.yaml", 16, machines=2, rank=1) + [
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29500",
        "--fsdp_activation_checkpointing", "true", "-m", "h1tune.cli", "train", "run.yaml", "--resume"]


@pytest.mark.parametrize("strategy, kind", [("ddp", "multi_gpu"), ("fsdp", "use_fsdp"),
                                            ("deepspeed_zero2", "use_deepspeed"), ("deepspeed_zero3", "use_deepspeed")])
def test_accelerate_reads_the_argv_as_intended(strategy, kind):
    """accelerate's own parser and validation: every flag is real, the shipped config selects the engine."""
    argv = launch_argv("run.yaml", cfg(strategy, gradient_checkpointing=True), TWO_NODES, ["--overwrite"])
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv[3:]))
    assert getattr(args, kind) is True
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 29500)
    assert args.module and args.training_script == "h1tune.cli"
    assert args.training_script_args == ["train", "run.yaml", "--overwrite"]
    if strategy == "fsdp":
        assert args.fsdp_version == 2 and args.fsdp_transformer_layer_cls_to_wrap == "FalconH1DecoderLayer"
        assert args.fsdp_state_dict_type == "SHARDED_STATE_DICT" and args.fsdp_activation_checkpointing == "true"
    if kind == "use_deepspeed":
        stage = strategy[-1]
        assert args.deepspeed_config_file.endswith(f"zero{stage}.json")
        assert args.deepspeed_multinode_launcher == "standard"  # torchrun per node, as under SLURM
        assert "mixed_precision" not in defaults.deepspeed_config  # accelerate refuses it beside a config file


def test_train_arguments_pass_resume_forms_through():
    assert train_arguments(["a=1", "b=2"]) == ["--set", "a=1", "--set", "b=2"]
    assert train_arguments([], resume=True) == ["--resume"]
    assert train_arguments([], overwrite=True, resume="checkpoint-200") == ["--overwrite", "--resume", "checkpoint-200"]


def test_one_ddp_process_needs_no_launcher_but_sharding_strategies_do():
    assert not needs_launch(cfg("ddp"), Topology(1))
    assert not needs_launch(cfg("none"), Topology(1))
    assert needs_launch(cfg("ddp"), Topology(2))
    assert needs_launch(cfg("fsdp"), Topology(1))  # FSDP with CPU offload on one GPU is a real use


def test_launch_runs_the_argv_with_the_given_launcher(monkeypatch):
    for name in launch_mod.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seen = []
    code = launch("run.yaml", cfg("ddp"), Topology(2), ["--overwrite"], launcher=lambda argv: seen.append(argv) or 7)
    assert code == 7
    assert seen == [head("ddp.yaml", 2) + ["-m", "h1tune.cli", "train", "run.yaml", "--overwrite"]]


def test_refusals_name_the_flag_and_the_fix(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check_launchable(cfg("fsdp"), Topology(nproc=0, nnodes=2, node_rank=2), environ={"LOCAL_RANK": "0"})
    text = str(err.value)
    for expected in ("--nproc: must be >= 1", "--node-rank: must be in 0..1", "--master-addr: required",
                     "already runs under a launcher (LOCAL_RANK=0)", "'fsdp' needs CUDA GPUs"):
        assert expected in text
    monkeypatch.setattr(launch_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        check_launchable(cfg("deepspeed_zero2"), Topology(2), environ={})


def test_cli_launches_instead_of_training(monkeypatch, tmp_path):
    """`h1tune train --nproc 2` builds the argv and hands it over; nothing trains in this process."""
    for name in launch_mod.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("training: {distributed: ddp}\noutput_dir: out\n")
    seen = []
    monkeypatch.setattr(launch_mod.subprocess, "call", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr("h1tune.train.run.run_training", lambda *a, **k: pytest.fail("trained in the launcher"))
    assert cli.main(["train", str(config), "--nproc", "2", "--set", "training.seed=5"]) == 0
    assert seen == [head("ddp.yaml", 2) + ["-m", "h1tune.cli", "train", str(config), "--set", "training.seed=5"]]


def test_cli_refuses_node_flags_without_nproc(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\n")
    assert cli.main(["train", str(config), "--nnodes", "2", "--master-addr", "h0"]) == 2
    err = capsys.readouterr().err
    assert "--nnodes: launches several processes, so it needs --nproc" in err and "--master-addr" in err
