"""The consumer apps (infer, serve, demo, export) are typed Hydra apps: defaults from their schemas, a misspelled key
or a value outside its choices fails naming it, and each command line really goes through Hydra."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from llama2_sft.config import CONF_DIR, Device, Dtype, ExportDtype, ExportFormat, GgufQuant, register_app_configs
from tests.conftest import REPO

APPS = ("infer", "serve", "demo", "export", "evaluate")
COMMANDS = {"infer": ["infer.py"], "serve": ["-m", "llama2_sft.serve"], "demo": ["-m", "llama2_sft.serve.demo"],
            "export": ["-m", "llama2_sft.export"], "evaluate": ["-m", "llama2_sft.evaluate"]}


def compose_app(app: str, overrides=()):
    from hydra import compose, initialize_config_dir

    register_app_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name=app, overrides=list(overrides))


def test_export_defaults_and_enumerated_values():
    cfg = compose_app("export", ["ckpt=outputs/embedded", "format=gguf", "quant=q8_0", "out=model.gguf"])
    assert (cfg.ckpt, cfg.out, cfg.format, cfg.quant) == ("outputs/embedded", "model.gguf", ExportFormat.gguf,
                                                          GgufQuant.q8_0)
    assert (cfg.dtype, cfg.device) == (ExportDtype.bf16, Device.cpu)


def test_demo_defaults_and_overrides():
    cfg = compose_app("demo", ["ckpt=/some/run"])
    assert (cfg.ckpt, cfg.port, cfg.host, cfg.device, cfg.dtype, cfg.share) == (
        "/some/run", 7860, "127.0.0.1", Device.auto, Dtype.auto, False)
    cfg = compose_app("demo", ["ckpt=x", "port=9000", "host=0.0.0.0", "share=true", "device=cpu", "dtype=bf16"])
    assert (cfg.port, cfg.host, cfg.share, cfg.device, cfg.dtype) == (9000, "0.0.0.0", True, Device.cpu, Dtype.bf16)


def test_serve_reads_the_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("LLAMA2_SFT_API_KEY", raising=False)
    assert compose_app("serve", ["ckpt=x"]).api_key is None
    monkeypatch.setenv("LLAMA2_SFT_API_KEY", "sekret")
    cfg = compose_app("serve", ["ckpt=x"])
    assert (cfg.api_key, cfg.port, cfg.max_queue) == ("sekret", 8000, 8)
    assert compose_app("serve", ["ckpt=x", "api_key=other"]).api_key == "other"


def test_infer_keeps_quoted_text_and_its_sampling_defaults():
    cfg = compose_app("infer", ["ckpt=outputs/embedded", 'prompt="3 加 4 等于几？"', "temperature=0"])
    assert cfg.prompt == "3 加 4 等于几？" and cfg.temperature == 0
    assert (cfg.system, cfg.max_new_tokens, cfg.top_p, cfg.input) == ("default", 512, 0.9, None)


@pytest.mark.parametrize("app", APPS)
def test_every_app_takes_a_lora_runs_base_defaulting_to_the_one_it_was_trained_from(app):
    assert compose_app(app, ["ckpt=x"]).base is None
    assert compose_app(app, ["ckpt=x", "base=/models/llama-2-7b"]).base == "/models/llama-2-7b"


def test_export_takes_format_peft():
    assert compose_app("export", ["ckpt=x", "out=y", "format=peft"]).format == ExportFormat.peft


@pytest.mark.parametrize("app", APPS)
def test_ckpt_is_required(app):
    assert "ckpt" in OmegaConf.missing_keys(compose_app(app))


@pytest.mark.parametrize("app, override, named", [
    ("export", "formt=hf", "formt"),
    ("serve", "prot=8001", "prot"),
    ("demo", "shar=true", "shar"),
    ("infer", "temprature=0", "temprature"),
    ("export", "format=onnx", "format"),
    ("export", "quant=q5_1", "quant"),
    ("serve", "port=abc", "port"),
    ("demo", "share=maybe", "share"),
    ("infer", "dtype=fp8", "dtype"),
    ("infer", "device=tpu", "device"),
])
def test_a_bad_key_or_value_fails_naming_it(app, override, named):
    with pytest.raises(ConfigCompositionException) as error:
        compose_app(app, ["ckpt=x", override])
    assert named in f"{error.value} {error.value.__cause__}"


@pytest.mark.parametrize("app", APPS)
def test_command_line_rejects_a_misspelled_key_naming_it(app):
    """Through the real entry point (its @hydra.main wiring), before anything heavy is imported."""
    done = subprocess.run([sys.executable, *COMMANDS[app], "ckpt=x", "formt=hf"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode != 0 and "formt" in done.stderr, done.stderr


def test_cfg_job_prints_the_settings_without_running():
    done = subprocess.run([sys.executable, "-m", "llama2_sft.export", "ckpt=x", "out=y", "format=gguf", "--cfg", "job"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr
    assert OmegaConf.create(done.stdout) == {"ckpt": "x", "out": "y", "format": "gguf", "dtype": "bf16",
                                             "quant": "f16", "base": None, "device": "cpu"}


def test_export_without_out_fails_naming_it_before_loading_anything():
    done = subprocess.run([sys.executable, "-m", "llama2_sft.export", "ckpt=/no/such/run"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode != 0 and "Missing mandatory value: out" in done.stderr, done.stderr


FREE_TEXT = ["你好", "3 加 4 等于几？", "a, b = c", "it's \"quoted\"", "</s>[INST] <<SYS>>", "${oc.env:HOME}", "[1, 2]",
             "{a: 1}", "null", "back\\slash\\", "\\'", "x=y=z", "  spaced  ", ""]


@pytest.mark.parametrize("text", FREE_TEXT)
def test_free_text_reaches_the_config_as_typed(text):
    from llama2_sft.config import free_text_argv

    argv = free_text_argv(["infer.py", "ckpt=x", f"prompt={text}", f"system={text}", "temperature=0"], ("prompt", "system"))
    cfg = compose_app("infer", argv[1:])
    assert (cfg.prompt, cfg.system, cfg.temperature) == (text, text, 0)


def test_free_text_quoting_round_trips_every_short_string_of_the_tricky_characters():
    """Exhaustive over strings of up to 3 characters from the ones Hydra's grammar or OmegaConf treat specially."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from llama2_sft.config import hydra_quote

    parser = OverridesParser.create()
    for length in range(1, 4):
        for chars in itertools.product(["\\", "'", '"', "$", "{", "}", "a", " ", "=", ","], repeat=length):
            text = "".join(chars)
            value = parser.parse_override(f"prompt={hydra_quote(text)}").value()
            assert OmegaConf.create({"prompt": value}).prompt == text, (text, hydra_quote(text))


def test_a_wholly_quoted_value_keeps_its_older_meaning():
    from llama2_sft.config import free_text_argv

    assert free_text_argv(["infer.py", 'prompt="3 加 4"'], ("prompt",)) == ["infer.py", 'prompt="3 加 4"']
    assert free_text_argv(["infer.py", 'prompt="a" or "b"'], ("prompt",)) == ["infer.py", "prompt='\"a\" or \"b\"'"]


@pytest.mark.parametrize("app", ["infer", "serve", "demo", "evaluate"])
def test_free_text_through_the_real_command_line(app):
    """Unquoted Chinese, spaces, punctuation, `=`, quotes, `</s>` and an interpolation-looking `${...}`: the settings
    the app would run with (`--cfg job --resolve`) hold them as typed."""
    text = '你好, world = "x" \'y\' </s> [INST] ${oc.env:HOME} 3 加 4 等于几？'
    keys = ["prompt", "system"] if app == "infer" else ["system"]
    done = subprocess.run([sys.executable, *COMMANDS[app], "ckpt=x", *(f"{key}={text}" for key in keys), "--cfg",
                           "job", "--resolve"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert [printed[key] for key in keys] == [text] * len(keys)
