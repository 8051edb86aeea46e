"""python -m llama2_sft.evaluate: lm-evaluation-harness on the model in process. With chat_template=false its numbers
are stock `lm_eval --model hf` on the exported HF directory of the same checkpoint; with chat_template=true the ids
that reach the model are encode_dialog's; bad task names and missing local data files are named. Local bundled tasks
(data/eval_tasks), a tiny run of train.py, a few documents per task."""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.test_training_parity import run_train
from tests.unit.test_apps import compose_app

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")

TASKS = "embedded_heldout,embedded_choice"
LIMIT = 12


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    from tests.conftest import REPO

    workdir = tmp_path_factory.mktemp("evaluate")
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        (workdir / "rows.jsonl").write_text("".join(next(handle) for _ in range(32)), encoding="utf-8")
    output_dir, _ = run_train(workdir, tiny_checkpoint, "run", ["trainer.max_steps=2", "trainer.save_steps=2",
                                                                "optimizer.lr=1e-2", "trainer.eval_tasks=[embedded_choice]"])
    return str(output_dir)


def _evaluate(run, *overrides):
    from llama2_sft.config import FREE_TEXT_KEYS, free_text_argv
    from llama2_sft.evaluate import evaluate

    argv = free_text_argv(["evaluate", f"ckpt={run}", f"tasks={TASKS}", f"limit={LIMIT}", "device=cpu", "dtype=fp32",
                           "batch_size=4", *overrides], FREE_TEXT_KEYS["evaluate"])  # as the command line does
    results = evaluate(compose_app("evaluate", argv[1:]))
    results.pop("_loaded")
    return results


def _numbers(results):
    return {f"{task} {key}": float(value) for task, metrics in results["results"].items()
            for key, value in metrics.items() if isinstance(value, (int, float))}


def _answers(results):
    return [sample["filtered_resps"] for sample in results["samples"]["embedded_heldout"]]


def test_plain_text_numbers_equal_stock_lm_eval_on_the_exported_hf_dir(run, tmp_path):
    from lm_eval.tasks import TaskManager

    from llama2_sft.evaluate import BUNDLED_TASKS, local_task_dir
    from llama2_sft.export.hf import export_hf
    from llama2_sft.inference.load import load_model

    ours_results = _evaluate(run, "chat_template=false")
    ours = _numbers(ours_results)
    export_hf(load_model(run, "cpu", "fp32"), str(tmp_path / "hf"), dtype="fp32")
    stock = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", tasks=TASKS.split(","), limit=LIMIT,
        batch_size=4, device="cpu", task_manager=TaskManager(include_path=local_task_dir([BUNDLED_TASKS],
                                                                                         str(tmp_path / "tasks"))),
        random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    assert {key.split()[0] for key in ours} == set(TASKS.split(","))
    assert ours == pytest.approx(_numbers(stock), rel=1e-6)
    assert _answers(ours_results) == _answers(stock)  # the greedy answers themselves, not only their score
    assert 0 < ours["embedded_choice acc,none"] < 1  # a number that could have come out differently


def test_chat_prompts_reach_the_model_as_encode_dialogs_ids(run, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from llama2_sft.data.chat import generation_prompt, text_encoder
    from llama2_sft.inference.load import load_model

    seen = {"generate": [], "loglikelihood": []}
    generate, loglikelihood = HFLM._model_generate, HFLM._loglikelihood_tokens

    def record_generate(self, context, max_length, stop, attention_mask=None, **kwargs):
        seen["generate"] += [row[mask.bool()].tolist() for row, mask in zip(context, attention_mask)]
        return generate(self, context, max_length, stop, attention_mask=attention_mask, **kwargs)

    def record_loglikelihood(self, requests, *args, **kwargs):
        seen["loglikelihood"] += [(context, continuation) for _, context, continuation in requests]
        return loglikelihood(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_generate", record_generate)
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", record_loglikelihood)
    results = _evaluate(run, "chat_template=true", "system=Answer briefly.")
    docs = {task: [sample["doc"] for sample in samples] for task, samples in results["samples"].items()}
    tokenizer = load_model(run, "cpu", "fp32").tokenizer
    system = {"role": "system", "content": "Answer briefly."}

    expected = [generation_prompt(tokenizer, [system, {"role": "user", "content": doc["question"]}])
                for doc in docs["embedded_heldout"]]
    assert sorted(seen["generate"]) == sorted(expected)

    letters = text_encoder(tokenizer).encode_batch(["A", "B", "C", "D"])  # "▁A": a reply's first token
    expected_pairs = []
    for doc in docs["embedded_choice"]:
        question = (f"{doc['question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\n答案：")
        context = generation_prompt(tokenizer, [system, {"role": "user", "content": question}])
        expected_pairs += [(context, letter) for letter in letters]
    assert sorted(seen["loglikelihood"]) == sorted(expected_pairs)


def test_trainer_eval_tasks_give_the_numbers_of_the_evaluate_app_on_the_final_checkpoint(run):
    with open(os.path.join(run, "eval", "results.json"), encoding="utf-8") as handle:
        at_the_end_of_training = json.load(handle)
    assert _numbers(at_the_end_of_training) == _numbers(_evaluate(run, "tasks=embedded_choice", "limit=null"))
    assert at_the_end_of_training["results"]["embedded_choice"]["sample_len"] == 300


def test_an_unknown_task_fails_listing_close_matches(run):
    with pytest.raises(ValueError, match=r"unknown task 'embedded_heldot'.*close matches: embedded_heldout"):
        _evaluate(run, "tasks=embedded_heldot")


def test_a_missing_local_data_file_is_named(run, tmp_path):
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        "    test: no_such_file.jsonl\ntest_split: test\noutput_type: generate_until\n"
                                        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"mine\.yaml: dataset_kwargs\.data_files\.test: data file .*"
                                                r"no_such_file\.jsonl does not exist"):
        _evaluate(run, "tasks=mine", f"include_path={tmp_path}")
