"""Launching the train stage through DeepSpeed: commands per runner, and a clear failure when a node is missing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, default_params, env_with_project

from stages.lib.train.launch import launcher_command
from stages.lib.core.params import validate


def params_with(**launch) -> object:
    raw = default_params()
    raw["train"]["deepspeed"] = "zero3"
    raw["train"]["launch"] |= launch
    return validate(raw)


def flags(cmd: list[str]) -> str:
    return " ".join(cmd[cmd.index("deepspeed.launcher.runner") + 1 :])


def test_single_node_uses_the_visible_gpus_unless_told():
    assert flags(launcher_command(params_with())) == "--master_addr 127.0.0.1 --master_port 29500 --module stages.train"
    assert "--num_gpus 4" in flags(launcher_command(params_with(gpus_per_node=4)))


def test_pdsh_with_a_hostfile_as_in_the_seed(tmp_path: Path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=4\nworker-2 slots=4\n")
    cmd = flags(launcher_command(params_with(nodes=2, gpus_per_node=4, hostfile=str(hostfile), master_addr="10.0.0.1")))
    assert cmd == (f"--master_addr 10.0.0.1 --master_port 29500 --hostfile {hostfile} --num_gpus 4 --num_nodes 2 "
                   "--launcher pdsh --module stages.train")


def test_no_ssh_mode_passes_this_nodes_rank_and_the_gpu_split(tmp_path: Path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=4\nnode1 slots=4\n")
    cmd = flags(launcher_command(params_with(nodes=2, runner="no-ssh", node_rank=1, hostfile=str(hostfile),
                                             include="node0:0,1@node1:2,3")))
    assert "--include node0:0,1@node1:2,3 --no_ssh --node_rank 1" in cmd and "--num_gpus" not in cmd


@pytest.mark.parametrize(
    "hostfile, launch, expect",
    [
        (None, {"hostfile": "/nope"}, "train.launch.hostfile /nope does not exist"),
        (None, {"hostfile": "."}, "train.launch.hostfile . is a directory"),
        ("node0 slots=0\n", {}, "node0 has slots=0"),
        ("node0 slots=99999999999999999999\n", {}, "node0 has slots=99999999999999999999"),
        ("\n", {}, "Hostfile is empty"),
        ("no-such-host.invalid slots=1\n", {}, "host no-such-host.invalid is not reachable over ssh"),
        ("localhost slots=2\n", {"include": "node0:0"}, "Hostname 'node0' not found"),
        (None, {"include": "node0:0"}, "without train.launch.hostfile the only host is localhost"),
    ],
)
def test_launch_settings_are_refused_before_any_rank_starts(tmp_path: Path, monkeypatch, hostfile, launch, expect):
    """Each of these reached DeepSpeed's launcher (or ssh) and ended in its traceback; now one UserError line."""
    from stages.lib.core.errors import UserError
    from stages.lib.train.launch import check_launch

    monkeypatch.chdir(tmp_path)
    if hostfile is not None:
        (tmp_path / "hostfile").write_text(hostfile)
        launch = {"hostfile": "hostfile", **launch}
    with pytest.raises(UserError, match=re.escape(expect)):
        check_launch(params_with(master_port=29517, **launch), 0)


@pytest.mark.parametrize(
    "zero, expect",
    [
        ('{"zero_optimization": {"stage": "3"}}', "zero_optimization.stage is the string '3'"),
        ('{"train_batch_size": "8", "zero_optimization": {"stage": 3}}', "train_batch_size is the string '8'"),
        ('{"zero_optimization": {"stage": 3, "reduce_bucket_size": NaN}}', "NaN is not a JSON number"),
        ('{"zero_optimization": {"stage": 3, "stage": 2}}', "duplicate key 'stage'"),
        ("[" * 100000, "nested too deeply"),
        ('{"zero_optimization": {"stage": 3}, "gradient_clipping": 1e999}', "gradient_clipping is inf"),
        ('{"bf16": {"enabled": "false"}, "zero_optimization": {"stage": 3}}', "bf16.enabled is the string 'false'"),
        ('{"optimizer": {"params": {"lr": "1e-4"}}}', "optimizer.params.lr is the string '1e-4'"),
        ('{"zero_optimisation": {"stage": 3}}', "did you mean 'zero_optimization'"),
        ('{"zero_optimization": {"offload_param": "cpu"}}', "zero_optimization.offload_param is the string 'cpu'"),
    ],
)
def test_deepspeed_configs_are_read_strictly(tmp_path: Path, monkeypatch, zero, expect):
    """DeepSpeed's schema accepted these, and transformers then ran another stage or failed inside a rank."""
    from stages.lib.core.errors import UserError
    from stages.lib.train.deepspeed_check import check_deepspeed

    (tmp_path / "recipes" / "deepspeed").mkdir(parents=True)
    (tmp_path / "recipes" / "deepspeed" / "mine.json").write_text(zero)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(expect)):
        check_deepspeed("mine")


@pytest.mark.slow  # waits out the rendezvous timeout (about 100 s); run with -m slow
def test_a_node_that_never_joins_fails_within_the_timeout(tmp_path: Path):
    """Node 0 of 2 starts alone (CPU, gloo): it gives up after timeout_minutes with a message, not a hang."""
    raw = default_params()
    raw["train"]["deepspeed"] = "zero3"
    raw["train"]["launch"] |= {"nodes": 2, "runner": "no-ssh", "hostfile": "hostfile", "node_rank": 0,
                               "timeout_minutes": 0.25, "master_port": 29631}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    (tmp_path / "data" / "tokenized" / "tokenizer").mkdir(parents=True)  # the stage's inputs, as stand-ins: the
    (tmp_path / "models" / "base").mkdir(parents=True)  # rank gives up before it reads them
    (tmp_path / "models" / "base" / "config.json").write_text("{}")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # the head checks the DeepSpeed config before launching
    env = env_with_project()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "gave up: not all 2 ranks joined within train.launch.timeout_minutes (0.25)" in out
    assert "the DeepSpeed launcher exited with status 3" in out
    assert elapsed < 200  # far below the default 30-minute collective timeout


@pytest.mark.parametrize("recipe", ["tiny-llama", "tiny-qwen3-moe"])
def test_two_cpu_processes_train_under_zero3(tmp_path: Path, recipe: str):
    """The ZeRO-3 path with two ranks on the CPU (gloo): the stage launches both, rank 0 writes a complete adapter.
    A mixture of experts too: each rank keeps about half of its 4-bit expert stacks after load."""
    from safetensors.torch import load_file

    for name in ("stages", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    raw = default_params()
    raw["model"]["recipe"] = recipe
    raw["train"] |= {"deepspeed": "zero3", "max_steps": 2, "logging_steps": 1}
    raw["train"]["launch"] |= {"gpus_per_node": 2, "timeout_minutes": 5, "master_port": 29641 + len(recipe)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = env_with_project() | {"DS_ACCELERATOR": "cpu"}
    for stage in ("download", "tokenize", "train"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{stage}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    from datasets import load_from_disk

    answers = sum(map(sum, load_from_disk(str(tmp_path / "data" / "tokenized"))["train"]["assistant_masks"]))
    assert (proc.stdout + proc.stderr).count(f"train: {answers} of ") == 2  # each rank trains the answers only
    config = json.loads((tmp_path / "models" / "adapter" / "train_config.json").read_text())
    assert config["world_size"] == 2 and config["global_steps"] == 2
    # each rank loaded only its shard of the 4-bit base: compare with what one process holds after the same load
    whole = one_rank_load_gib(tmp_path, raw)
    per_rank = config["load_weights_gib_per_rank"]
    assert len(per_rank) == 2 and all(0 < gib <= 0.55 * whole for gib in per_rank), (per_rank, whole)
    weights = load_file(tmp_path / "models" / "adapter" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.numel() > 0 for w in lora_b)  # gathered from both ranks' shards on save
    assert any(w.abs().sum() > 0 for w in lora_b)


def one_rank_load_gib(project: Path, raw: dict) -> float:
    """GiB of weights one process holds after loading the project's 4-bit base whole (no ZeRO-3), as train counts."""
    import torch

    from stages.lib.core.params import Params
    from stages.lib.train import sharded_load
    from stages.lib.train.base_load import quantization_config

    params = Params.model_validate(raw)
    model = sharded_load.load(project / "models" / "base", quantization_config(params), getattr(torch, params.train.dtype))
    return sharded_load.resident_bytes(model) / sharded_load.GIB
