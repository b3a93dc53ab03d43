"""Bad input, stage by stage: each is refused with exit code 2 and one line on stderr that names the
key, file or row and how to fix it, with no traceback, and nothing created or deleted (issue #15).

Everything runs in-process through `rlhf.cli.main`, so the table takes seconds. Cases that name a
trained model use the session's `tiny_stack`; a bad value is refused before any model loads, so
nothing here trains.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlhf.cli import main

# A case: (argv, with {placeholders} filled from `paths`), then the fragments its one line must hold.
Case = tuple[str, tuple[str, ...]]

STACK = "{sft} {reward} {data} {base}"  # placeholders that need the tiny_stack fixture
HOSTS = "{dead_host} {dead_host2} {live_host} {html_host} {html_404}"  # placeholders that need the `hosts` fixture
PPO = "ppo --model {sft} --reward_model {reward} --data {data} --output_dir {tmp}/out"
SFT = "sft --model {base} --data {data} --output_dir {tmp}/out"
REWARD = "reward --model {sft} --data {data} --output_dir {tmp}/out"
EVAL = "eval --models {sft} --data {data} --output_dir {tmp}/out"
EXPORT = "export --model {sft} --output_dir {tmp}/out"
PREF = "data preference --output_dir {tmp}/out"
TINY = "tiny-model --output_dir {tmp}/out"
GYM = "gym train --output_dir {tmp}/out"
PIPE = "pipeline --output_dir {tmp}/run"
OLLAMA_PREF = PREF + " --teacher ollama --n 4"
# a run of PPO that would be valid (and quick), for the cases that break one file it reads
PPO_OK = PPO + " --total_episodes 4 --batch_size 4 --eval_prompts 0 --report_to none"


def bound(prefix: str, key: str, value: str, rule: str, shown: str | None = None) -> Case:
    """A value outside a declared constraint: the line names the key, the value, the rule and a fix."""
    return f"{prefix} --{key} {value}", (f"--{key} {shown or value}:", f"must be {rule}", f"--{key} ")


def not_finite(prefix: str, key: str, value: str) -> Case:
    return f"{prefix} --{key} {value}", (f"--{key} {value}:", "must be a finite number")


NO_FOLDER = ("cannot create the folder", "is a file, not a folder", "pass a folder you can write to")
BROKEN_WEIGHTS = ("{bad_weights}/model.safetensors: not a readable safetensors file", "restore it")
BROKEN = ("bad_weights", "cut_weights", "bad_tokenizer", "bad_config")  # model folders from `broken_models`
# the issue's own case, where the machine has that file (a folder is never created there: it exists)
ETC_HOSTNAME: list[Case] = [("data tabular --output_dir /etc/hostname", ("--output_dir /etc/hostname:", *NO_FOLDER))
                            ] if os.path.isfile("/etc/hostname") else []

CASES: list[Case] = [
    # -- the command line itself --------------------------------------------------------------------
    ("frobnicate", ("unknown stage 'frobnicate'", "rlhf --help")),
    ("data", ("'rlhf data' needs one of", "preference", "tabular")),
    ("tabular", ("'rlhf tabular' needs one of", "train", "predict")),
    ("gym", ("'rlhf gym' needs one of", "train", "eval")),
    (PREF + " --nn 5", ("unknown key 'nn'", "did you mean 'n'")),
    (PREF + " --n", ("--n: a value is required", "--n VALUE")),
    (PREF + " five", ("unexpected argument 'five'", "--key value")),
    (PREF + " --config {tmp}/missing.yaml", ("{tmp}/missing.yaml", "not found", "--config")),
    (PREF + " --config {files}/broken.yaml", ("{files}/broken.yaml", "not valid YAML", "line")),
    (PREF + " --config {files}/list.yaml", ("{files}/list.yaml", "top level must be a mapping")),
    (PREF + " --config {files}/unknown.yaml", ("{files}/unknown.yaml", "unknown key 'teachr'", "'teacher'")),
    (PREF + " --config {files}/bad_value.yaml", ("{files}/bad_value.yaml", "--batch_size 0:", "must be >= 1")),
    (PREF + " --config {files}/latin1.yaml", ("{files}/latin1.yaml: not UTF-8 text", "save the config as UTF-8")),
    # dashes: --key-name is --key_name, so these reach their fields (and their constraints)
    (PPO + " --num-mini-batches 0", ("--num_mini_batches 0:", "must be >= 1", "e.g. --num_mini_batches 1")),
    (SFT + " --learning-rate -1", ("--learning_rate -1.0:", "must be > 0")),
    (PREF + " --sft-label-noise 2", ("--sft_label_noise 2.0:", "must be >= 0 and <= 1")),
    ("data tabular --output-dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
    *ETC_HOSTNAME,
    # -- data preference ----------------------------------------------------------------------------
    (PREF + " --n 0", ("--n must be a positive number of rows", "got 0")),
    (PREF + " --n -5", ("--n must be a positive number of rows", "got -5")),
    (PREF + " --n many", ("key 'n'", "expected an integer", "'many'")),
    bound(PREF, "test_fraction", "1.5", ">= 0 and < 1"),
    not_finite(PREF, "test_fraction", "nan"),
    bound(PREF, "sft_label_noise", "-0.1", ">= 0 and <= 1"),
    bound(PREF, "sft_n", "-1", ">= 0"),
    bound(PREF, "batch_size", "0", ">= 1"),
    bound(PREF, "concurrency", "0", ">= 1"),
    bound(PREF, "timeout", "0", "> 0", "0.0"),
    bound(PREF, "retries", "-1", ">= 0"),
    bound(PREF, "backoff", "-1", ">= 0", "-1.0"),
    bound(PREF, "seed", "-1", ">= 0 and <= 4294967295"),
    (PREF + " --language fr", ("--language 'fr'", "use one of")),
    (PREF + " --teacher gpt", ("--teacher 'gpt'", "use rule or ollama")),
    (PREF + " --variant env", ("--variant 'env'", "use --variant dims")),
    (PREF + " --rule bogus", ("--rule 'bogus'", "use one of")),
    (PREF + " --rejection_weights '{bogus: 1}'", ("--rejection_weights", "unknown strategy 'bogus'")),
    (PREF + " --rejection_weights '{off_topic: 0}'", ("--rejection_weights", "positive sum")),
    (PREF + " --rejection_weights '[1, 2]'", ("key 'rejection_weights'", "expected a mapping")),
    (PREF + " --overwrite perhaps", ("key 'overwrite'", "expected true or false")),
    (PREF + " --n 1 --test_fraction 0.9", ("--n 1 with --test_fraction 0.9", "raise --n")),
    (PREF + " --n 2000000", ("exceeds the 1000000 distinct chips", "fewer rows")),
    ("data preference --output_dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
    (PREF + " --rejection_weights '{off_topic: .nan}'", ("--rejection_weights: the weight of 'off_topic'",
                                                         "must be a finite number >= 0", "got nan")),
    (PREF + " --rejection_weights '{wrong_action: .inf}'", ("the weight of 'wrong_action'", "got inf")),
    (PREF + " --rejection_weights '{wrong_action: 1, off_topic: -1}'", ("the weight of 'off_topic'", "got -1")),
    (PREF + " --rejection_weights '{wrong_action: true}'", ("the weight of 'wrong_action'", "got True")),
    # -- Ollama hosts (the data teacher; the judges share its pre-flight check) ----------------------
    (OLLAMA_PREF + " --ollama_host {dead_host}", ("cannot reach Ollama at {dead_host}", "ollama serve")),
    (OLLAMA_PREF + " --ollama_host {dead_host},{dead_host2}",
     ("no Ollama host serves model 'qwen2.5:7b'", "{dead_host} cannot be reached", "{dead_host2} cannot be reached",
      "--ollama_host")),
    (OLLAMA_PREF + " --ollama_host {dead_host},{live_host} --ollama_model nope",
     ("no Ollama host serves model 'nope'", "{dead_host} cannot be reached", "{live_host} does not have model 'nope'")),
    (OLLAMA_PREF + " --ollama_host {live_host} --ollama_model nope",
     ("does not have model 'nope'", "ollama pull nope")),
    (OLLAMA_PREF + " --ollama_host {html_host}", ("{html_host} answered HTTP 200", "<!DOCTYPE html>",
                                                  "is this an Ollama server? check --ollama_host", "!END-OF-PAGE")),
    (OLLAMA_PREF + " --ollama_host {html_404}", ("{html_404} answered HTTP 404", "is this an Ollama server?",
                                                 "!ollama pull", "!END-OF-PAGE")),
    # a refused host into a folder of the user's own: neither args.json nor rlhf_config.yaml is left in it
    (OLLAMA_PREF.replace("{tmp}/out", "{user_dir}") + " --ollama_host {dead_host}",
     ("cannot reach Ollama at {dead_host}",)),
    # ... and into the folder of an earlier run: its rlhf_config.yaml is put back as it was
    (OLLAMA_PREF.replace("{tmp}/out", "{earlier_run}") + " --ollama_host {dead_host}",
     ("cannot reach Ollama at {dead_host}",)),
    (GYM + " --judge ollama --ollama_host {dead_host}", ("cannot reach Ollama at {dead_host}",)),
    (GYM + " --judge ollama --ollama_host {html_404}", ("{html_404} answered HTTP 404", "!END-OF-PAGE")),
    # -- data tabular -------------------------------------------------------------------------------
    bound("data tabular --output_dir {tmp}/out", "n", "0", ">= 1"),
    ("data tabular --output_dir {tmp}/out --variant spreadsheet", ("key 'variant'", "expected one of dims, env")),
    ("data tabular --output_dir {tmp}/out --n 2000000", ("--n 2000000", "only 1000000 distinct chips")),
    bound("data tabular --output_dir {tmp}/out", "seed", "4294967296", ">= 0 and <= 4294967295"),
    ("data tabular --output_dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
    # -- tiny-model ---------------------------------------------------------------------------------
    (TINY + " --num_heads 3", ("--num_heads 3 does not divide --hidden_size 128", "pick a divisor")),
    (TINY + " --hidden_size 12 --num_heads 4", ("odd head size (3)", "even")),
    (TINY + " --num_kv_heads 3", ("--num_kv_heads 3 does not divide --num_heads 4", "--num_kv_heads 1")),
    bound(TINY, "vocab_size", "0", ">= 259"),
    bound(TINY, "vocab_size", "258", ">= 259"),
    bound(TINY, "hidden_size", "0", ">= 2"),
    bound(TINY, "num_layers", "0", ">= 1"),
    bound(TINY, "num_heads", "0", ">= 1"),
    bound(TINY, "num_kv_heads", "-1", ">= 1"),
    bound(TINY, "intermediate_size", "0", ">= 1"),
    bound(TINY, "max_position_embeddings", "0", ">= 1"),
    ("tiny-model --output_dir {a_file}/model", ("--output_dir {a_file}/model:", *NO_FOLDER)),
    # -- sft ----------------------------------------------------------------------------------------
    bound(SFT, "learning_rate", "-1", "> 0", "-1.0"),
    not_finite(SFT, "learning_rate", "nan"),
    bound(SFT, "per_device_train_batch_size", "0", ">= 1"),
    bound(SFT, "num_train_epochs", "-1", "> 0", "-1.0"),
    bound(SFT, "num_train_epochs", "0", "> 0", "0.0"),
    bound(SFT, "max_steps", "-2", ">= -1"),
    bound(SFT, "gradient_accumulation_steps", "0", ">= 1"),
    bound(SFT, "max_new_tokens", "0", ">= 1"),
    bound(SFT, "max_length", "0", ">= 1"),
    bound(SFT, "warmup_steps", "-1", ">= 0"),
    bound(SFT, "eval_prompts", "-1", ">= 0"),
    bound(SFT, "lora_r", "0", ">= 1"),
    bound(SFT, "lora_dropout", "1.5", ">= 0 and < 1"),
    bound(SFT, "lora_layers", "-1", ">= 0"),
    (SFT + " --dtype float64", ("key 'dtype'", "expected one of float32, bfloat16, float16, auto")),
    (SFT + " --use_lora maybe", ("key 'use_lora'", "expected true or false")),
    ("sft --model {base} --data {data} --output_dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
    ("sft --model {bad_weights} --data {data} --output_dir {tmp}/out --max_steps 1", BROKEN_WEIGHTS),
    ("sft --model {tmp}/no_model --data {data} --output_dir {tmp}/out", ("model not found: {tmp}/no_model",)),
    ("sft --model {base} --data {tmp}/no_data --output_dir {tmp}/out", ("data file not found: {tmp}/no_data",
                                                                         "--data DIR")),
    # -- reward -------------------------------------------------------------------------------------
    bound(REWARD, "learning_rate", "-1", "> 0", "-1.0"),
    bound(REWARD, "per_device_train_batch_size", "0", ">= 1"),
    bound(REWARD, "num_train_epochs", "-1", "> 0", "-1.0"),
    bound(REWARD, "eval_batch_size", "0", ">= 1"),
    bound(REWARD, "center_rewards_coefficient", "-1", ">= 0", "-1.0"),
    not_finite(REWARD, "margin", "inf"),
    ("reward --model {bad_weights} --data {data} --output_dir {tmp}/out --max_steps 1", BROKEN_WEIGHTS),
    ("reward --model {sft} --data {data} --output_dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
    # -- score --------------------------------------------------------------------------------------
    bound("score --model {reward} --prompt hi --response there", "batch_size", "0", ">= 1"),
    ("score --model {reward} --file {tmp}/missing.jsonl", ("{tmp}/missing.jsonl: file not found",
                                                           "pass an existing .jsonl file")),
    ("score --model {reward} --file {tmp}", ("{tmp} is a folder", "pass a .jsonl file")),
    ("score --model {reward} --file {files}/empty.jsonl", ("{files}/empty.jsonl: no rows", "'prompt'")),
    ("score --model {reward} --file {files}/broken.jsonl", ("{files}/broken.jsonl: line 2 is not valid JSON",
                                                            "fix or delete that line")),
    ("score --model {reward} --file {files}/no_response.jsonl", ("{files}/no_response.jsonl: row 1",
                                                                 "needs 'prompt' and 'response'")),
    ("score --model {reward}", ("pass --prompt TEXT --response TEXT, or --file FILE.jsonl",)),
    ("score --model {reward} --file {files}/role_missing.jsonl", ("{files}/role_missing.jsonl: row 1:",
                                                                  "chosen[0] needs a string 'role'")),
    ("score --model {reward} --file {files}/response_dict.jsonl", ("{files}/response_dict.jsonl: row 1:",
                                                                   "'response' must be a string")),
    ("score --model {bad_weights} --prompt hi --response there", BROKEN_WEIGHTS),
    ("score --model {cut_weights} --prompt hi --response there",
     ("{cut_weights}/model.safetensors: not a readable safetensors file", "rerun the stage that wrote")),
    ("score --model {bad_tokenizer} --prompt hi --response there", ("{bad_tokenizer}/tokenizer.json: not valid JSON",
                                                                    "restore it")),
    ("score --model {bad_config} --prompt hi --response there", ("{bad_config}/config.json: not valid JSON",
                                                                 "restore it")),
    ("score --model {sft} --prompt hi --response there", ("--model {sft}: not a reward model",
                                                          "point --model at the reward stage's output")),
    ("score --model {reward} --prompt hi --response there --output_dir {a_file}",
     ("--output_dir {a_file}:", *NO_FOLDER)),
    # -- ppo ----------------------------------------------------------------------------------------
    bound(PPO, "batch_size", "0", ">= 1"),
    bound(PPO, "num_mini_batches", "0", ">= 1"),
    bound(PPO, "response_length", "0", ">= 1"),
    bound(PPO, "learning_rate", "-1", "> 0", "-1.0"),
    not_finite(PPO, "learning_rate", "inf"),
    bound(PPO, "cliprange", "-0.2", "> 0"),
    bound(PPO, "cliprange_value", "0", "> 0", "0.0"),
    bound(PPO, "kl_coef", "-1", ">= 0", "-1.0"),
    not_finite(PPO, "kl_coef", "nan"),
    bound(PPO, "temperature", "0", "> 0", "0.0"),
    bound(PPO, "top_p", "0", "> 0 and <= 1", "0.0"),
    bound(PPO, "top_p", "1.5", "> 0 and <= 1"),
    bound(PPO, "top_k", "-1", ">= 0"),
    bound(PPO, "gamma", "2", ">= 0 and <= 1", "2.0"),
    bound(PPO, "lam", "-0.1", ">= 0 and <= 1"),
    bound(PPO, "num_ppo_epochs", "0", ">= 1"),
    bound(PPO, "gradient_accumulation_steps", "0", ">= 1"),
    bound(PPO, "samples_per_prompt", "0", ">= 1"),
    bound(PPO, "total_episodes", "0", ">= 1"),
    bound(PPO, "max_grad_norm", "-1", ">= 0", "-1.0"),
    bound(PPO, "vf_coef", "-1", ">= 0", "-1.0"),
    bound(PPO, "target_kl", "0", "> 0", "0.0"),
    bound(PPO, "score_clip", "-1", ">= 0", "-1.0"),
    bound(PPO, "score_scale", "0", "> 0", "0.0"),
    bound(PPO, "missing_eos_penalty", "-1", ">= 0", "-1.0"),
    bound(PPO, "answer_entropy_coef", "-1", ">= 0", "-1.0"),
    bound(PPO, "keep_checkpoints", "0", ">= 1"),
    bound(PPO, "log_every", "0", ">= 1"),
    bound(PPO, "collapse_share", "0", "> 0 and <= 1", "0.0"),
    (PPO + " --batch_size 6 --num_mini_batches 4", ("batch_size (6) must be divisible by num_mini_batches (4)",)),
    (PPO + " --total_episodes 8 --batch_size 16", ("total_episodes (8) must be at least batch_size (16)",)),
    (PPO + " --total_episodes 20 --batch_size 8", ("total_episodes (20) must be a multiple of batch_size (8)",
                                                   "use 16 or 24")),
    (PPO + " --score_baseline group", ("samples_per_prompt >= 2", "--samples_per_prompt 4")),
    (PPO + " --stop_token newline", ("key 'stop_token'", "expected one of eos, none")),
    (PPO + " --kl_estimator k2", ("key 'kl_estimator'", "expected one of k1, k3")),
    (PPO + " --rewards '[1, 2]'", ("key 'rewards'", "expected a mapping")),
    (PPO + " --rewards '{}'", ("--rewards is empty", "{model: 1.0}")),
    (PPO + " --rewards '{bogus: 1}'", ("--rewards: unknown reward source 'bogus'", "model, rule, bonus")),
    (PPO + " --rewards '{rule: .nan}'", ("--rewards: the weight of 'rule' must be a finite number", "nan")),
    (PPO + " --rewards '{rule: heavy}'", ("--rewards: the weight of 'rule' must be a finite number", "'heavy'")),
    (PPO_OK.replace("--data {data}", "--data {tmp}/no_data"), ("data file not found: {tmp}/no_data",)),
    (PPO_OK + " --value_model {bad_weights}", BROKEN_WEIGHTS),
    (PPO_OK.replace("--model {sft}", "--model {bad_weights}"), BROKEN_WEIGHTS),
    (PPO_OK.replace("--reward_model {reward}", "--reward_model {bad_weights}"), BROKEN_WEIGHTS),
    (PPO.replace("{tmp}/out", "{a_file}"), ("--output_dir {a_file}:", *NO_FOLDER)),
    # the SFT model as the reward model: a causal LM, whose score head would be drawn at random
    (PPO_OK.replace("--reward_model {reward}", "--reward_model {sft}"),
     ("--reward_model {sft}: not a reward model", "Qwen2ForCausalLM", "point --reward_model at the reward stage")),
    # a bad value into a folder of the user's own: refused, and the folder left as it was
    (PPO.replace("{tmp}/out", "{user_dir}") + " --kl_coef -1", ("--kl_coef -1.0:", "must be >= 0")),
    # -- eval ---------------------------------------------------------------------------------------
    bound(EVAL, "max_new_tokens", "0", ">= 1"),
    bound(EVAL, "n", "0", ">= 1"),
    bound(EVAL, "temperature", "0", "> 0", "0.0"),
    bound(EVAL, "batch_size", "0", ">= 1"),
    bound(EVAL, "n_samples", "-1", ">= 0"),
    bound(EVAL, "concurrency", "0", ">= 1"),
    bound(EVAL, "timeout", "-1", "> 0", "-1.0"),
    (EVAL + " --dtype float64", ("key 'dtype'", "expected one of")),
    ("eval --data {data} --output_dir {tmp}/out", ("nothing to evaluate", "--models name=PATH")),
    ("eval --models a={sft},a={base} --data {data} --output_dir {tmp}/out", ("the name 'a' is used twice",)),
    ("eval --models =x --data {data} --output_dir {tmp}/out", ("--models: '=x' is not name=VALUE",)),
    ("eval --models {bad_weights} --data {data} --output_dir {tmp}/out --n 2", BROKEN_WEIGHTS),
    (EVAL + " --n 2 --reference {bad_weights}", BROKEN_WEIGHTS),
    (EVAL + " --n 2 --reward_model {bad_tokenizer}", ("{bad_tokenizer}/tokenizer.json: not valid JSON",)),
    ("eval --models {sft} --data {files}/broken.jsonl --output_dir {tmp}/out", ("{files}/broken.jsonl: line 2",)),
    (EVAL + " --n 2 --reward_model {sft}", ("--reward_model {sft}: not a reward model", "rlhf reward")),
    ("eval --models {sft} --data {data} --output_dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
    # -- export -------------------------------------------------------------------------------------
    bound(EXPORT, "num_ctx", "-1", ">= 1"),
    bound(EXPORT, "num_ctx", "0", ">= 1"),
    bound(EXPORT, "temperature", "-3", ">= 0", "-3.0"),
    not_finite(EXPORT, "temperature", "nan"),
    bound(EXPORT, "top_p", "7", "> 0 and <= 1", "7.0"),
    bound(EXPORT, "top_k", "-1", ">= 0"),
    bound(EXPORT, "repeat_penalty", "0", "> 0", "0.0"),
    (EXPORT + " --num_ctx -1 --temperature -3 --top_p 7", ("--temperature -3.0:", "must be >= 0")),
    (EXPORT + " --outtype q4_0", ("key 'outtype'", "expected one of f32, f16, bf16, q8_0")),
    (EXPORT + " --name 'Bad Name'", ("--name 'Bad Name'", "e.g. chip-advisor:latest")),
    ("export --model {bad_weights} --output_dir {tmp}/out", BROKEN_WEIGHTS),
    ("export --model {tmp}/no_model --output_dir {tmp}/out", ("model not found: {tmp}/no_model",)),
    ("export --model {reward} --output_dir {tmp}/out", ("Qwen2ForSequenceClassification cannot be exported",
                                                        "supported: Qwen2ForCausalLM")),
    ("export --model {sft} --output_dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
    # -- tabular train / predict --------------------------------------------------------------------
    bound("tabular train --output_dir {tmp}/out", "test_size", "0", "> 0 and < 1", "0.0"),
    bound("tabular train --output_dir {tmp}/out", "test_size", "1", "> 0 and < 1", "1.0"),
    bound("tabular train --output_dir {tmp}/out", "n_estimators", "0", ">= 1"),
    bound("tabular train --output_dir {tmp}/out", "max_depth", "0", ">= 1"),
    ("tabular train --output_dir {tmp}/out --model svm", ("key 'model'", "expected one of random_forest")),
    ("tabular train --output_dir {tmp}/out --data {tmp}/missing.csv", ("{tmp}/missing.csv: file not found",
                                                                       "rlhf data tabular")),
    ("tabular train --output_dir {tmp}/out --data {files}/no_height.csv", ("{files}/no_height.csv",
                                                                           "missing column 'height'")),
    ("tabular train --output_dir {tmp}/out --data {files}/bad_cell.csv", ("{files}/bad_cell.csv",
                                                                          "line 3, column 'width'")),
    ("tabular predict --model_dir {empty_dir} --length nan --width inf --height -5",
     ("--length nan:", "must be a finite number > 0", "pass a finite number > 0")),
    ("tabular predict --model_dir {empty_dir} --length 5 --width inf --height 5", ("--width inf:", "finite")),
    ("tabular predict --model_dir {empty_dir} --length 5 --width 5 --height -5",
     ("--height -5.0:", "must be > 0")),
    ("tabular predict --model_dir {empty_dir} --length 0 --width 5 --height 5", ("--length 0.0:", "must be > 0")),
    ("tabular predict --length 5 --width 5 --height 5", ("missing required key 'model_dir'", "--model_dir VALUE")),
    ("tabular predict --model_dir {empty_dir} --length 5 --width 5 --height 5",
     ("{empty_dir}: no classifier here", "rlhf tabular train")),
    ("tabular predict --model_dir {files}/classifier --length 5 --width 5 --height 5",
     ("{files}/classifier/classifier.json: not a classifier written by `rlhf tabular train`",)),
    # -- gym train / eval ---------------------------------------------------------------------------
    bound(GYM, "learning_rate", "-1", "> 0", "-1.0"),
    bound(GYM, "n_envs", "0", ">= 1"),
    bound(GYM, "batch_size", "0", ">= 1"),
    bound(GYM, "n_steps", "0", ">= 1"),
    bound(GYM, "n_epochs", "0", ">= 1"),
    bound(GYM, "total_timesteps", "0", ">= 1"),
    bound(GYM, "gamma", "1.5", ">= 0 and <= 1"),
    bound(GYM, "ent_coef", "-1", ">= 0", "-1.0"),
    bound(GYM, "net_arch", "64,0", ">= 1"),
    (GYM + " --net_arch ''", ("--net_arch needs at least one layer", "64,64")),
    (GYM + " --judge gpt", ("key 'judge'", "expected one of none, model, ollama")),
    (GYM + " --env_csv {tmp}/missing.csv", ("{tmp}/missing.csv: file not found", "rlhf data tabular")),
    ("gym eval --model_dir {empty_dir} --output_dir {tmp}/out", ("{empty_dir}/agent.json: missing or unreadable",
                                                                 "rlhf gym train")),
    ("gym eval --output_dir {tmp}/out", ("missing required key 'model_dir'",)),
    bound("gym eval --model_dir {empty_dir} --output_dir {tmp}/out", "eval_episodes", "0", ">= 1"),
    bound("gym eval --model_dir {empty_dir} --output_dir {tmp}/out", "torch_threads", "0", ">= 1"),
    # -- pipeline: the top level, and every stage's section checked before anything runs -------------
    (PIPE + " --from bogus", ("--from 'bogus' is not a stage", "use one of")),
    (PIPE + " --name ..", ("name '..'", "e.g. chip-demo")),
    (PIPE + " --name a/b", ("name 'a/b'", "one folder name")),
    bound(PIPE, "threads", "-1", ">= 0"),
    bound(PIPE, "seed", "-1", ">= 0 and <= 4294967295"),
    (PIPE + " --dtype float64", ("key 'dtype'", "expected one of")),
    (PIPE + " --ppo '{batch_size: 0}'", ("section 'ppo'", "--batch_size 0:", "must be >= 1")),
    (PIPE + " --ppo '{kl_coef: -1}'", ("section 'ppo'", "--kl_coef -1.0:", "must be >= 0")),
    (PIPE + " --sft '{learning_rate: -1}'", ("section 'sft'", "--learning_rate -1.0:", "must be > 0")),
    (PIPE + " --reward '{per_device_train_batch_size: 0}'", ("section 'reward'", "--per_device_train_batch_size 0:")),
    (PIPE + " --tiny_model '{num_heads: 3}'", ("--num_heads 3 does not divide --hidden_size 128",)),
    (PIPE + " --data '{sft_label_noise: 2}'", ("section 'data'", "--sft_label_noise 2.0:")),
    (PIPE + " --eval '{max_new_tokens: 0}'", ("section 'eval'", "--max_new_tokens 0:")),
    (PIPE + " --export '{top_p: 7}'", ("section 'export'", "--top_p 7.0:", "must be > 0 and <= 1")),
    (PIPE + " --ppo '{output_dir: elsewhere}'", ("key 'output_dir' is set by the pipeline", "remove it")),
    (PIPE + " --ppo '{output-dir: elsewhere}'", ("key 'output-dir' is set by the pipeline",)),
    (PIPE + " --ppo '{nope: 1}'", ("section 'ppo'", "unknown key 'nope'")),
    (PIPE + " --reward '{enabled: false}'", ("the reward stage cannot be disabled",)),
    ("pipeline --output_dir {a_file}", ("--output_dir {a_file}:", *NO_FOLDER)),
]


def _fill(text: str, paths: dict[str, str]) -> str:
    """{name} -> paths[name]; YAML's own braces ('{batch_size: 0}') are left alone."""
    return re.sub(r"\{(\w+)\}", lambda m: paths[m.group(1)], text)


def _argv_and_needles(case: Case, paths: dict[str, str]) -> tuple[list[str], list[str]]:
    template, needles = case
    return shlex.split(_fill(template, paths)), [_fill(n, paths) for n in needles]


def _tree(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under `root` with its kind, size and mtime: what 'nothing created or deleted' compares."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = ("dir" if p.is_dir() else "file", 0 if p.is_dir() else st.st_size,
                                             0 if p.is_dir() else st.st_mtime_ns)
    return out


_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


def _error_lines(stderr: str) -> list[str]:
    """stderr without Python warnings (the `file:line: XWarning:` line and its source line) and the
    one-time notice bitsandbytes logs when it finds no `kernels` package."""
    lines, skip = [], False
    for line in stderr.splitlines():
        if skip and line.startswith(" "):
            skip = False
            continue
        skip = bool(_WARNING.match(line))
        if skip or "kernels-community" in line or not line.strip():
            continue
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad input files, shared by the cases (read-only: the snapshot checks that too)."""
    d = tmp_path_factory.mktemp("bad_files")
    (d / "broken.yaml").write_text("n: [1, 2\nseed: 3\n")
    (d / "list.yaml").write_text("- n: 5\n")
    (d / "unknown.yaml").write_text("n: 5\nteachr: rule\n")
    (d / "bad_value.yaml").write_text("n: 5\nbatch_size: 0\n")
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (d / "no_response.jsonl").write_text('{"prompt": "a"}\n')
    (d / "no_height.csv").write_text("length,width,action\n1,2,increase\n")
    (d / "bad_cell.csv").write_text("length,width,height,action\n1,2,3,increase\n4,x,6,decrease\n")
    (d / "latin1.yaml").write_bytes("n: 5  # Größe\n".encode("latin-1"))
    (d / "role_missing.jsonl").write_text('{"prompt": "a", "chosen": [{"content": "b"}]}\n')
    (d / "response_dict.jsonl").write_text('{"prompt": "a", "response": {"text": "b"}}\n')
    (d / "classifier").mkdir()
    (d / "classifier" / "classifier.json").write_text("{}\n")
    (d / "classifier" / "classifier.skops").write_bytes(os.urandom(100))
    return d


@pytest.fixture(scope="module")
def broken_models(tiny_stack: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Copies of the tiny SFT model, each with one damaged file: model.safetensors as random bytes or cut
    in half, tokenizer.json or config.json not JSON."""
    root = tmp_path_factory.mktemp("broken_models")
    out = {}
    for name in BROKEN:
        d = root / name
        shutil.copytree(tiny_stack["sft"], d)
        out[name] = str(d)
    weights = Path(out["cut_weights"], "model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    Path(out["bad_weights"], "model.safetensors").write_bytes(os.urandom(4096))
    Path(out["bad_tokenizer"], "tokenizer.json").write_text('{"version": ')
    Path(out["bad_config"], "config.json").write_text("{not json")
    return out


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, str]]:
    """Hosts for --ollama_host: two closed ports, a loopback Ollama serving qwen2.5:7b, and two web
    servers that are not Ollama (an HTML page with HTTP 200 and with 404)."""
    from ollama_server import HtmlServer, LoopbackOllama

    def closed_port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{s.getsockname()[1]}"

    with LoopbackOllama() as live, HtmlServer(200) as html, HtmlServer(404) as html_404:
        yield {"dead_host": closed_port(), "dead_host2": closed_port(), "live_host": live.url,
               "html_host": html.url, "html_404": html_404.url}


def _case_id(case: Case) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\{\w+\}/?|--(model|data|reward_model|output_dir|models) \S+", "",
                                      case[0])).strip()[:80]


@pytest.mark.parametrize("case", CASES, ids=[f"{i:03d} {_case_id(c)}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, request: pytest.FixtureRequest, files: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # a default (relative) output folder would land here, and be seen
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    paths: dict[str, Any] = {"tmp": str(tmp_path), "files": str(files), "a_file": str(tmp_path / "a_file"),
                             "empty_dir": str(tmp_path / "empty"), "user_dir": str(tmp_path / "mine"),
                             "earlier_run": str(tmp_path / "earlier")}
    (tmp_path / "a_file").write_text("a file where a folder is asked for\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file\n")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "rlhf_config.yaml").write_text("# rlhf data preference: an earlier run's settings\nn: 7\n")
    watched = [tmp_path, files]
    broken = any(f"{{{k}}}" in case[0] for k in BROKEN)
    if broken or any(k in case[0] for k in STACK.split()):
        stack = request.getfixturevalue("tiny_stack")
        paths.update(stack)
        watched.append(Path(stack["base"]).parent)
    if any(k in case[0] for k in HOSTS.split()):
        paths.update(request.getfixturevalue("hosts"))
    if broken:
        paths.update(request.getfixturevalue("broken_models"))
        watched.append(Path(paths["bad_weights"]).parent)
    argv, needles = _argv_and_needles(case, paths)
    out = argv[argv.index("--output_dir") + 1] if "--output_dir" in argv else None
    out_existed = out is not None and os.path.lexists(out)
    before = {str(w): _tree(w) for w in watched}
    capsys.readouterr()

    code = main(argv)

    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert code == 2, (argv, captured.err[-2000:])
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("rlhf: error: "), lines
    for needle in needles:  # "!text": text must not be in the line (a web page quoted whole, a wrong fix)
        if needle.startswith("!"):
            assert needle[1:] not in lines[0], (needle, lines[0])
        else:
            assert needle in lines[0], (needle, lines[0])
    assert {str(w): _tree(w) for w in watched} == before, "files were created, changed or deleted"
    if out is not None and not out_existed:
        assert not os.path.lexists(out)


def test_the_table_covers_every_stage_and_the_issue() -> None:
    from rlhf.stages import STAGES

    assert len(CASES) >= 100
    for stage in STAGES:
        assert any(c[0].startswith(stage + " ") or c[0] == stage for c in CASES), stage
