"""Benchmark evaluation through EleutherAI's lm-evaluation-harness, on the model in this process (no export, no server).

    python -m llama2_sft.evaluate ckpt=outputs/embedded                              # the bundled local tasks
    python -m llama2_sft.evaluate ckpt=RUN tasks=ceval-valid,cmmlu,mmlu num_fewshot=5 batch_size=16
    python -m llama2_sft.evaluate ckpt=RUN tasks=my_task include_path=/path/to/task_yamls chat_template=false

`ckpt` is loaded as `infer.py` loads it (a run, a checkpoint of any strategy, a LoRA run merged into its base, an HF
dir). lm-eval builds the requests and scores them; nothing of ours scores. What is ours is the prompt:

* `chat_template=true` (default): each request's chat (the `system` setting, few-shot turns, the question) becomes
  ids through `generation_prompt`, the same `encode_dialog` that built the training data, and a scored continuation
  (a multiple-choice letter, say) is encoded as training encodes the start of a reply (SentencePiece, dummy prefix:
  `▁A`). lm-eval would otherwise render a chat template to text and re-tokenize it.
* `chat_template=false`: plain text, exactly lm-eval's `--model hf` on the exported model (tested).

Writes lm-eval's results JSON and a table (task, metric, value, stderr, n-shot) to `out/`, prints the table, and logs
the figures to the run's W&B run when the run had `logger=wandb`. Task YAMLs of `include_path` and the bundled
`data/eval_tasks` may name local data files relative to their own folder (`dataset_path: json`, `data_files`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from llama2_sft.config import CONF_DIR, FREE_TEXT_KEYS, free_text_argv, register_app_configs

log = logging.getLogger(__name__)

BUNDLED_TASKS = os.path.join(os.path.dirname(CONF_DIR), "data", "eval_tasks")
_DIALOG_START, _DIALOG_END = "\x00llama2_sft-dialog\x00", "\x00/llama2_sft-dialog\x00"


# ----------------------------------------------------------------------------------------------- tasks and files
def task_names(tasks: Any) -> list[str]:
    """`tasks=a,b` or `tasks=[a, b]` -> ['a', 'b'] (the command line hands both over as text)."""
    names = tasks.strip().strip("[]").split(",") if isinstance(tasks, str) else list(tasks)
    names = [str(name).strip() for name in names if str(name).strip()]
    if not names:
        raise ValueError("tasks: no task named (e.g. tasks=embedded_heldout or tasks=ceval-valid,cmmlu,mmlu)")
    return names


class _Tagged:
    """A YAML value under a custom tag (lm-eval's `!function utils.x`), kept as written."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


def _yaml_io():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    def construct(loader, tag_suffix, node):
        return _Tagged("!" + tag_suffix, loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode)
                       else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
                       else loader.construct_mapping(node))

    Loader.add_multi_constructor("!", construct)
    Dumper.add_representer(_Tagged, lambda dumper, data: (
        dumper.represent_scalar(data.tag, data.value) if isinstance(data.value, str)
        else dumper.represent_sequence(data.tag, data.value) if isinstance(data.value, list)
        else dumper.represent_mapping(data.tag, data.value)))
    return yaml, Loader, Dumper


def _absolute_data_files(data_files: Any, folder: str, where: str) -> Any:
    """data_files (a path, a list, or split -> path/list) made absolute against `folder`; a missing one fails."""
    if isinstance(data_files, dict):
        return {split: _absolute_data_files(value, folder, f"{where}.{split}") for split, value in data_files.items()}
    if isinstance(data_files, list):
        return [_absolute_data_files(value, folder, where) for value in data_files]
    path = str(data_files)
    if "://" in path:
        return path
    path = path if os.path.isabs(path) else os.path.normpath(os.path.join(folder, path))
    if not re.search(r"[*?\[]", path) and not os.path.exists(path):
        raise FileNotFoundError(f"{where}: data file {path} does not exist")
    return path


def local_task_dir(include_paths: list[str], work: str) -> str:
    """Copy each folder of task YAMLs into `work`, with local `data_files` made absolute (lm-eval reads them relative
    to the working directory) and checked: a missing data file fails here, naming the YAML and the file."""
    yaml, Loader, Dumper = _yaml_io()
    for index, source in enumerate(include_paths):
        if not os.path.isdir(source):
            raise FileNotFoundError(f"include_path: {source} is not a folder of task YAMLs")
        target = os.path.join(work, f"{index}_{os.path.basename(os.path.normpath(source))}")
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.jsonl", "*.json", "*.parquet", "*.csv"))
        for folder, _, files in os.walk(source):
            for name in files:
                if not name.endswith((".yaml", ".yml")):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    spec = yaml.load(handle, Loader=Loader)
                files_spec = (spec or {}).get("dataset_kwargs", {}) if isinstance(spec, dict) else {}
                if not isinstance(files_spec, dict) or "data_files" not in files_spec:
                    continue
                files_spec["data_files"] = _absolute_data_files(files_spec["data_files"], folder,
                                                                f"{path}: dataset_kwargs.data_files")
                with open(os.path.join(target, os.path.relpath(path, source)), "w", encoding="utf-8") as handle:
                    yaml.dump(spec, handle, Dumper=Dumper, allow_unicode=True, sort_keys=False)
    return work


def check_tasks(names: list[str], task_manager: Any) -> None:
    """Every name must be an lm-eval task, group or tag; an unknown one fails listing the closest names."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"tasks: unknown task {name!r}{hint} (lm-eval knows {len(known)} names; local task "
                             f"YAMLs come from include_path and {BUNDLED_TASKS})")


# ----------------------------------------------------------------------------------------------- the model
def make_lm(loaded: Any, chat_template: bool, batch_size: int, device: str):
    """lm-eval's HFLM over the loaded model; with `chat_template`, prompts are built by `encode_dialog`."""
    from lm_eval.models.huggingface import HFLM

    from llama2_sft.data.chat import generation_prompt, text_encoder

    class ChatLM(HFLM):
        """HFLM whose chat prompts are our llama-2-chat ids. lm-eval passes rendered chats around as strings and
        tokenizes them later: the rendering here is a marker around the JSON of the messages, read back at
        tokenization, so the ids are generation_prompt's and never a re-tokenization of text."""

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return _DIALOG_START + json.dumps(chat_history, ensure_ascii=False) + _DIALOG_END

        def dialog_ids(self, string: str) -> list[int] | None:
            if not string.startswith(_DIALOG_START):
                return None
            end = string.index(_DIALOG_END)
            messages = json.loads(string[len(_DIALOG_START):end])
            continuation = string[end + len(_DIALOG_END):]
            prefix = ""
            if messages and messages[-1]["role"] == "assistant":  # a reply prefix (lm-eval's gen_prefix)
                prefix, messages = messages[-1]["content"], messages[:-1]
            ids = generation_prompt(self.tokenizer, messages)
            reply = (prefix + continuation).strip()
            if reply:  # scored or forced text: the start of an assistant reply, encoded as training encodes one
                ids = ids + text_encoder(self.tokenizer).encode_batch([reply])[0]
            return ids

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            ids = self.dialog_ids(string)
            if ids is None:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                             truncation: bool = False):
            import torch

            if not strings or self.dialog_ids(strings[0]) is None:
                return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
            seqs = [self.tok_encode(s, left_truncate_len=left_truncate_len) for s in strings]
            width = max(len(s) for s in seqs)
            pad = self.tokenizer.pad_token_id
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
                ids[row, span] = torch.tensor(seq, dtype=torch.long)
                mask[row, span] = 1
            return ids, mask

    cls = ChatLM if chat_template else HFLM
    return cls(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=device)


# ----------------------------------------------------------------------------------------------- results
def result_rows(results: dict) -> list[list[str]]:
    """[task, metric, value, stderr, n-shot] per reported metric, as lm-eval reports them."""
    rows = []
    for task, metrics in results["results"].items():
        shots = results.get("n-shot", {}).get(task, "")
        for key, value in metrics.items():
            if key == "alias" or key.startswith("sample_len") or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append([task, metric if filter_name in ("", "none") else f"{metric} ({filter_name})", f"{value:.4f}",
                         f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "", str(shots)])
    return rows


def write_results(results: dict, out: str) -> str:
    """out/results.json (lm-eval's results) and out/results.md (the table); returns the table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({k: v for k, v in results.items() if k != "samples"}, handle, indent=1, ensure_ascii=False,
                  default=str)
    header = ["task", "metric", "value", "stderr", "n-shot"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in result_rows(results)]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    return table


def _log_to_wandb(loaded: Any, results: dict) -> None:
    """Into the run's own W&B run when it logged to W&B (its id is in the checkpoint's trainer_state.json)."""
    wandb_cfg = None if loaded.train_config is None else OmegaConf.select(loaded.train_config, "logger.wandb")
    if wandb_cfg is None or not wandb_cfg.enabled:
        return
    try:
        with open(os.path.join(loaded.source, "trainer_state.json"), encoding="utf-8") as handle:
            run_id = (json.load(handle).get("metrics") or {}).get("wandb_run_id")
    except OSError:
        return
    if not run_id:
        return
    try:
        import wandb

        mode = str(wandb_cfg.mode)
        run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, id=run_id, resume="allow",
                         mode=None if mode == "auto" else mode, dir=os.path.dirname(os.path.dirname(loaded.source)))
        run.log({f"benchmark/{task}/{metric}": float(value) for task, metric, value, _, _ in result_rows(results)})
        run.finish()
    except Exception as error:  # noqa: BLE001 - W&B never stops an evaluation
        log.warning("W&B logging failed: %s", error)


def evaluate(cfg: Any) -> dict:
    """Run lm-eval with `cfg` (an EvaluateConfig); returns lm-eval's results dict (samples included)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llama2_sft.inference.load import load_model, resolve_device, system_prompt_setting

    names = task_names(cfg.tasks)
    work = tempfile.mkdtemp(prefix="llama2_sft_tasks_")
    try:
        includes = [BUNDLED_TASKS] + ([os.path.abspath(os.path.expanduser(cfg.include_path))] if cfg.include_path else [])
        task_manager = TaskManager(include_path=local_task_dir(includes, work))
        check_tasks(names, task_manager)  # before the model loads
        loaded = load_model(cfg.ckpt, cfg.device.value if hasattr(cfg.device, "value") else cfg.device,
                            cfg.dtype.value if hasattr(cfg.dtype, "value") else cfg.dtype, base=cfg.base)
        device = str(resolve_device(cfg.device.value if hasattr(cfg.device, "value") else cfg.device))
        lm = make_lm(loaded, cfg.chat_template, cfg.batch_size, device)
        system = system_prompt_setting(loaded, cfg.system) if cfg.chat_template else None
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=task_manager,
            apply_chat_template=bool(cfg.chat_template), fewshot_as_multiturn=bool(cfg.chat_template),
            system_instruction=system, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed, log_samples=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["llama2_sft"] = {"ckpt": cfg.ckpt, "source": loaded.source, "kind": loaded.kind,
                             "chat_template": bool(cfg.chat_template), "system": system}
    results["_loaded"] = loaded
    return results


def evaluate_and_report(cfg: Any) -> dict:
    """evaluate(), then out/results.json + results.md, the table printed, and the figures to the run's W&B run."""
    results = evaluate(cfg)
    loaded = results.pop("_loaded")
    out = cfg.out or (os.path.join(loaded.source, "eval") if loaded.kind != "hf" else "eval_results")
    table = write_results(results, out)
    print(table, end="")
    print(f"results: {os.path.join(out, 'results.json')}")
    _log_to_wandb(loaded, results)
    return results


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate_and_report(cfg)


if __name__ == "__main__":
    register_app_configs()
    sys.argv = free_text_argv(sys.argv, FREE_TEXT_KEYS["evaluate"])
    main()
