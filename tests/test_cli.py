"""The ``moe-serve`` command line, run as the real entry point in subprocesses.

Each subprocess pays for importing torch (~2-4 s on the 2-core CI machine), so one module fixture runs every
command once, two at a time (the checkpoint is made once), and the tests check the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models.generate import greedy_generate
from models.loading import load_model
from models.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCOUT_CONFIG = ROOT.parent / "shared" / "models" / "llama4-scout-17b-16e.config.json"
TIMEOUT_S = 120


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, MOE_SERVE_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=ROOT, env=_env(home),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe_serve_home")


BAD_INPUTS = {  # name -> generate arguments after --checkpoint CKPT (None: a pickle-only checkpoint directory)
    "non_integer_id": ["--prompt-ids", "1,x"],
    "id_out_of_vocab": ["--prompt-ids", "99999999"],
    "zero_max_tokens": ["--max-tokens", "0"],
    "past_context": ["--prompt-ids", "1,2", "--max-tokens", "5000"],  # the tiny preset has 4096 positions
    "missing_checkpoint": ["--checkpoint", "/nonexistent", "--prompt", "Hi"],
    "pickle_checkpoint": None,
}


def _make_pickle_dir(d: Path, checkpoint: Path) -> Path:
    """A checkpoint directory whose only weights are a pickle ``pytorch_model.bin`` (never unpickled)."""
    d.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((checkpoint / name).read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def runs(work, home) -> dict[str, subprocess.CompletedProcess]:
    """Every command, two at a time (the machine has two cores); those that need the checkpoint that
    ``make-checkpoint`` writes wait for it, the others run beside it."""
    ckpt = work / "ckpt"
    independent = {
        "make": ["make-checkpoint", ckpt, "--preset", "tiny", "--seed", "1"],
        "default_checkpoint": ["generate", "--prompt", "Hello", "--max-tokens", "4"],
        "bad:missing_checkpoint": ["generate", *BAD_INPUTS["missing_checkpoint"]],
    }
    if SCOUT_CONFIG.is_file():
        independent["params"] = ["params", SCOUT_CONFIG]
    dependent = {
        "prompt": ["generate", "--checkpoint", ckpt, "--prompt", "Hello", "--max-tokens", "8", "--json"],
        "prompt_ids": ["generate", "--checkpoint", ckpt, "--prompt-ids", "1,2,3", "--json"],
        "bad:pickle_checkpoint": ["generate", "--checkpoint", work / "pickle_only", "--prompt", "Hi"],
        "shards": ["generate", "--checkpoint", ckpt, "--prompt-ids", "1,2,3", "--max-tokens", "8", "--json",
                   "--shards", "2", "--nodes", "2"],
    }
    for name, args in BAD_INPUTS.items():
        if args is not None and "--checkpoint" not in args:
            dependent[f"bad:{name}"] = ["generate", "--checkpoint", ckpt, *args]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_cli, args, home) for name, args in independent.items()}
        made = futures["make"].result()
        if made.returncode == 0:
            _make_pickle_dir(work / "pickle_only", ckpt)
            futures.update({name: pool.submit(_cli, args, home) for name, args in dependent.items()})
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def checkpoint(runs, work) -> Path:
    _ok(runs["make"])
    return work / "ckpt"


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def test_make_checkpoint_writes_a_loadable_checkpoint(runs, checkpoint, model):
    assert "wrote tiny checkpoint (seed 1)" in runs["make"].stdout
    for name in ("config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (checkpoint / name).is_file(), name
    assert model.cfg.vocab_size >= Tokenizer.from_dir(checkpoint).vocab_size  # the writer pads the vocabulary
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_generate_prompt_json_matches_in_process_greedy(runs, checkpoint, model):
    out = json.loads(_ok(runs["prompt"]).stdout)
    assert set(out) == {"token_ids", "text"}
    ids = out["token_ids"]
    tok = Tokenizer.from_dir(checkpoint)
    eos = tok.eos_token_ids
    assert 1 <= len(ids) <= 8
    assert len(ids) == 8 or ids[-1] in eos  # fewer than asked only when a stop id came
    assert isinstance(out["text"], str) and out["text"] == tok.decode(ids, skip_special_tokens=True)
    prompt = torch.tensor([tok.encode("Hello")])
    expected = greedy_generate(model, prompt, 8, eos)[0].tolist()
    assert ids == expected


def test_generate_prompt_ids(runs, checkpoint, model):
    out = json.loads(_ok(runs["prompt_ids"]).stdout)
    ids = out["token_ids"]
    assert 1 <= len(ids) <= 32  # the default --max-tokens
    tok = Tokenizer.from_dir(checkpoint)
    assert out["text"] == tok.decode(ids, skip_special_tokens=True)
    expected = greedy_generate(model, torch.tensor([[1, 2, 3]]), 32, tok.eos_token_ids)
    assert ids == expected[0].tolist()


def test_generate_through_expert_shards_on_ray(runs, checkpoint, model):
    """`--shards 2 --nodes 2`: a local Ray cluster, two expert-shard actors, the same greedy tokens."""
    out = json.loads(_ok(runs["shards"]).stdout)
    tok = Tokenizer.from_dir(checkpoint)
    assert out["token_ids"] == greedy_generate(model, torch.tensor([[1, 2, 3]]), 8, tok.eos_token_ids)[0].tolist()


def test_generate_without_checkpoint_makes_the_default(runs, home):
    proc = _ok(runs["default_checkpoint"])
    default = home / "tiny"
    assert (default / "config.json").is_file() and (default / "tokenizer.json").is_file()
    assert "making the tiny default checkpoint" in proc.stderr
    assert proc.stdout.strip(), "expected the generated text"
    load_model(default)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_error(runs, checkpoint, name):
    proc = runs[f"bad:{name}"]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moe-serve generate: error: ")
    assert proc.stdout == ""
    expect = {"non_integer_id": "1,x", "id_out_of_vocab": "99999999", "zero_max_tokens": "--max-tokens",
              "past_context": "4096",
              "missing_checkpoint": "/nonexistent does not exist", "pickle_checkpoint": "pickle"}[name]
    assert expect in lines[0]


def test_params_of_scout(runs):
    if "params" not in runs:
        pytest.skip(f"{SCOUT_CONFIG} is absent")
    out = _ok(runs["params"]).stdout
    total = next(line for line in out.splitlines() if line.startswith("total parameters"))
    active = next(line for line in out.splitlines() if line.startswith("active per token"))
    assert "108.6" in total
    assert "17.1" in active or "17.2" in active
