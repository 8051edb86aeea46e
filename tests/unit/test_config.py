"""Config tree: every experiment composes, every _target_ binds, mistakes fail naming the key."""

from __future__ import annotations

import glob
import os

import pytest
from omegaconf import OmegaConf

from llama2_sft.config import bind_target, validate
from tests.conftest import CONF_DIR, compose

EXPERIMENTS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONF_DIR, "experiment", "*.yaml")))
STRATEGIES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONF_DIR, "strategy", "*.yaml")))


def test_default_config_composes_and_validates():
    cfg = compose()
    validate(cfg)
    assert cfg.model.tokenizer == "data/tokenizer" and cfg.dataset.source == "data/train.jsonl"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_binds_its_targets(experiment):
    cfg = compose([f"+experiment={experiment}"])
    validate(cfg)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_binds_to_its_class(strategy):
    cfg = compose([f"strategy={strategy}"])
    bind_target(cfg.strategy, "strategy")


@pytest.mark.parametrize(
    "strategy, stage, offload_optimizer, offload_param",
    [
        ("deepspeed_zero2", 2, False, False),
        ("deepspeed_zero2_offload", 2, True, False),
        ("deepspeed_zero3", 3, False, False),
        ("deepspeed_zero3_offload", 3, True, True),
    ],
)
def test_deepspeed_variants_inherit_the_base_and_change_only_stage_and_offload(strategy, stage, offload_optimizer,
                                                                               offload_param):
    block = OmegaConf.to_container(compose([f"strategy={strategy}"]).strategy)
    assert block == {"_target_": "llama2_sft.strategy.deepspeed.DeepSpeedStrategy", "stage": stage,
                     "offload_optimizer": offload_optimizer, "offload_param": offload_param, "overlap_comm": True,
                     "contiguous_gradients": True}


def test_sft_7b_states_the_reference_recipe():
    cfg = compose(["+experiment=sft_7b"])
    assert cfg.precision == "bf16" and cfg.tf32 is True
    assert cfg.strategy._target_.endswith("FSDPStrategy") and cfg.strategy.reshard_after_forward is True
    assert cfg.model.gradient_checkpointing is True and cfg.model.checkpoint_policy == "full"
    assert cfg.dataset.packing is False and cfg.trainer.cross_entropy == "fused"  # the reference's padded batches
    assert "Llama-2-7b" in cfg.model.name_or_path
    assert cfg.dataset.source == "LinkSoul/instruction_merge_set" and cfg.dataset.max_length == 4096
    assert cfg.optimizer.lr == 2e-5 and cfg.optimizer.weight_decay == 0.0
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.warmup_ratio == 0.03
    assert (cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps, cfg.trainer.epochs) == (4, 1, 1)
    assert (cfg.trainer.save_steps, cfg.trainer.save_total_limit, cfg.trainer.max_grad_norm) == (1200, 5, 1.0)


def test_sft_7b_composes_to_the_reference_batches_of_32_padded_samples_per_step_on_8_gpus():
    cfg = compose(["+experiment=sft_7b"])
    assert cfg.dataset.packing is False and cfg.dataset.max_length == 4096
    assert cfg.trainer.micro_batch_size * 8 * cfg.trainer.grad_accum_steps == 32
    assert (cfg.trainer.max_steps, cfg.trainer.epochs) == (-1, 1)  # one epoch: 10M rows / 32 steps


def test_sft_7b_packed_changes_only_packing_and_the_rows_per_gpu():
    base, packed = compose(["+experiment=sft_7b"]), compose(["+experiment=sft_7b_packed"])
    assert packed.dataset.packing is True and packed.trainer.micro_batch_size == 1
    assert packed.experiment_name == "sft_7b_packed" and packed.output_dir == "outputs/sft_7b_packed"
    base_values, packed_values = (OmegaConf.to_container(cfg, resolve=True) for cfg in (base, packed))
    for values in (base_values, packed_values):
        del values["dataset"]["packing"], values["trainer"]["micro_batch_size"], values["experiment_name"]
        del values["output_dir"], values["logger"]["wandb"]["name"]
    assert base_values == packed_values


@pytest.mark.parametrize("reference, zero3", [("sft_7b", "sft_7b_zero3"), ("sft_7b_packed", "sft_7b_zero3_packed")])
def test_the_zero3_experiments_only_swap_the_strategy(reference, zero3):
    base, swapped = compose([f"+experiment={reference}"]), compose([f"+experiment={zero3}"])
    assert swapped.strategy._target_.endswith("DeepSpeedStrategy") and swapped.strategy.stage == 3
    assert swapped.experiment_name == zero3
    for key in ("precision", "tf32", "optimizer", "scheduler", "trainer", "dataset", "model"):
        assert OmegaConf.to_container(base)[key] == OmegaConf.to_container(swapped)[key], key


def test_sft_7b_zero3_only_swaps_the_strategy():
    base, zero3 = compose(["+experiment=sft_7b"]), compose(["+experiment=sft_7b_zero3"])
    assert zero3.strategy._target_.endswith("DeepSpeedStrategy") and zero3.strategy.stage == 3
    for key in ("precision", "optimizer", "scheduler", "trainer", "dataset", "model"):
        assert OmegaConf.to_container(base)[key] == OmegaConf.to_container(zero3)[key], key


def _leaves(node, prefix=""):
    """Dotted keys and values of a yaml body (dicts walked, lists kept whole)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _body(path):
    body = OmegaConf.to_container(OmegaConf.load(path))
    body.pop("defaults", None), body.pop("hydra", None)
    return body or {}


@pytest.mark.parametrize(
    "pattern, package",
    [("train.yaml", ""), ("dataset/*.yaml", "dataset."), ("model/*.yaml", "model."), ("logger/*.yaml", "logger.")],
)
def test_config_files_repeat_no_schema_default(pattern, package):
    from llama2_sft.config import TrainConfig

    defaults = dict(_leaves(OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)))
    for path in glob.glob(os.path.join(CONF_DIR, pattern)):
        for key, value in _leaves(_body(path), package):
            assert value != defaults.get(key), f"{os.path.relpath(path, CONF_DIR)}: {key}={value!r} is the schema's default"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_file_states_only_what_it_changes(experiment):
    path = os.path.join(CONF_DIR, "experiment", f"{experiment}.yaml")
    parent = []  # the experiment's defaults list as overrides: what is in effect before its own keys
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(entry, dict):
            (group, choice), = entry.items()
            parent.append(f"{group.removeprefix('override /')}={choice}")
        elif entry != "_self_":
            parent.append(f"+experiment={entry}")
    in_effect = compose(parent)
    for key, value in _leaves(_body(path)):
        assert value != OmegaConf.select(in_effect, key), f"{experiment}: {key}={value!r} is already in effect"


def test_misspelled_key_fails_at_compose_time_naming_it():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_lenght"):
        compose(["dataset.max_lenght=10"])
    with pytest.raises(ConfigCompositionException, match="micro_batch"):
        compose(["trainer.micro_batch=2"])


def test_a_dataset_without_a_source_fails_validation_naming_the_key():
    with pytest.raises(ValueError, match=r"dataset\.source is not set"):
        validate(compose(["dataset=jsonl"]))


def test_wrong_type_fails_at_compose_time_naming_the_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="micro_batch_size"):
        compose(["trainer.micro_batch_size=four"])


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("precision=fp16", "precision", "fp32, bf16"),
        ("scheduler.name=step", "scheduler.name", "cosine, linear, constant"),
        ("trainer.cross_entropy=liger", "trainer.cross_entropy", "fused, logits"),
        ("trainer.on_nan=ignore", "trainer.on_nan", "stop, skip"),
        ("model.checkpoint_policy=some", "model.checkpoint_policy", "full, selective"),
        ("model.attn_implementation=flash", "model.attn_implementation", "sdpa, eager, flash_attention_2"),
        ("dataset.truncation=cut", "dataset.truncation", "turns, drop"),
        ("logger.wandb.mode=quiet", "logger.wandb.mode", "auto, online, offline, disabled"),
    ],
)
def test_a_value_outside_an_enumeration_fails_at_compose_time_naming_the_key_and_the_choices(override, key, allowed):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")) as failure:
        compose([override])
    cause = str(failure.value.__cause__)
    assert f"full_key: {key}" in cause and f"expected one of [{allowed}]" in cause


def test_enumerated_values_compare_as_strings_and_save_as_plain_yaml():
    cfg = compose(["precision=bf16", "trainer.on_nan=skip"])
    assert cfg.precision == "bf16" and cfg.trainer.on_nan == "skip" and cfg.trainer.cross_entropy == "fused"
    assert f"{cfg.precision}" == str(cfg.precision) == "bf16" and {"bf16": 2}[cfg.precision] == 2
    saved = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))  # what a checkpoint's config.yaml reads back as
    assert type(saved.precision) is str and saved.precision == "bf16" and saved.model.checkpoint_policy == "full"


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
        ("dataset.eval_fraction=1.5", "dataset.eval_fraction"),
        ("+strategy.reshard=true", "strategy.reshard"),
        ("+optimizer.momentum=0.9", "optimizer.momentum"),
        ("model.checkpoint_every_n_layers=0", "model.checkpoint_every_n_layers"),
        ("trainer.ce_chunk_size=0", "trainer.ce_chunk_size"),
    ],
)
def test_invalid_values_fail_validation_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(compose([override]))


def test_slurm_launcher_config_is_in_the_repo():
    path = os.path.join(CONF_DIR, "hydra", "launcher", "slurm.yaml")
    text = open(path).read()
    assert "submitit_slurm" in text and "tasks_per_node" in text


def test_max_length_beyond_the_models_positions_fails_before_any_heavy_work(tiny_checkpoint):
    from llama2_sft.config import preflight

    cfg = compose([f"model.name_or_path={tiny_checkpoint}", "model.arch=null", "dataset.max_length=4096"])
    with pytest.raises(ValueError, match=r"dataset\.max_length=4096 exceeds the model's max_position_embeddings=256"):
        preflight(cfg, None)
    with pytest.raises(ValueError, match=r"dataset\.max_length=1024 exceeds"):
        preflight(compose(["dataset.max_length=1024"]), None)  # the tiny random-init arch has 256 positions
    preflight(compose(), None)


def test_fast_paths_the_device_cannot_run_fail_before_any_heavy_work(monkeypatch):
    import shutil

    import torch

    from llama2_sft.config import preflight

    with pytest.raises(ValueError, match=r"model\.attn_implementation=flash_attention_2 needs a CUDA device"):
        preflight(compose(["model.attn_implementation=flash_attention_2"]), torch.device("cpu"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"model\.compile=true .* needs a C\+\+ compiler"):
        preflight(compose(["model.compile=true", "model.compile_fallback=false"]), torch.device("cpu"))
    preflight(compose(["model.compile=true", "model.compile_backend=aot_eager"]), torch.device("cpu"))


def test_without_a_compiler_compile_fallback_trains_eagerly_and_says_so(monkeypatch, caplog):
    import shutil

    import torch

    from llama2_sft.config import preflight

    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = compose(["model.compile=true", "model.compile_fallback=true"])
    with caplog.at_level("WARNING"):
        preflight(cfg, torch.device("cpu"))
    assert cfg.model.compile is False
    assert "no C++ compiler" in caplog.text and "install g++" in caplog.text


@pytest.mark.parametrize("overrides", [["strategy=fsdp"], ["strategy=deepspeed_zero3"], ["peft=lora"]])
def test_compiling_the_whole_decoder_where_it_cannot_run_fails_naming_the_key_or_falls_back(overrides, caplog):
    scope = ["model.compile=true", "model.compile_scope=decoder"]
    with pytest.raises(ValueError, match=r"model\.compile_scope=decoder .*model\.compile_scope=layers"):
        validate(compose([*overrides, *scope, "model.compile_fallback=false"]))
    validate(compose([*overrides, "model.compile=true", "model.compile_scope=layers", "model.compile_fallback=false"]))
    cfg = compose([*overrides, *scope, "model.compile_fallback=true"])  # the tiny preset: compile where possible
    with caplog.at_level("WARNING"):
        validate(cfg)
    assert cfg.model.compile is False and "training eagerly" in caplog.text


def test_the_embedded_default_compiles_its_decoder():
    cfg = compose()
    validate(cfg)
    assert cfg.model.compile and cfg.model.compile_scope == "decoder" and cfg.model.compile_fallback


def test_a_missing_model_path_is_named(tmp_path):
    from llama2_sft.config import preflight

    with pytest.raises(ValueError, match="model.name_or_path"):
        preflight(compose([f"model.name_or_path={tmp_path}/nope", "model.arch=null"]), None)


def test_deepspeed_strategy_without_deepspeed_installed_fails_at_validation(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match="needs DeepSpeed"):
        validate(compose(["strategy=deepspeed_zero3"]))
