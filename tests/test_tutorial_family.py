"""The tutorial's four commands for the later family, through the loopback Hub (tests/hub_server.py): download,
convert, generate and chat for microsoft/Phi-3.5-mini-instruct and microsoft/Phi-4-mini-instruct. The repos hold
random weights of a small shape in the Hub's file layout: config.json with the real keys (longrope, partial rotary,
grouped-query attention, tied embeddings), sharded safetensors and their index, the real tokenizers rebuilt from
their vocabularies, the checkpoints' chat templates and generation_config.json with their eos ids."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_checkpoints import hf_state_dict, hub_phi3_config_json, random_hf_model, save_weights, tiny_phi3_config
from hub_server import HubServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
REPOS = {
    # the real repos' generation_config.json eos ids: <|end|>, <|endoftext|> (and </s> for Phi-3.5)
    "microsoft/Phi-3.5-mini-instruct": dict(config=dict(n_embd=64, n_head=4, vocab_size=32064), eos=[32007, 32001, 32000],
                                            bos=1, end="<|end|>"),
    "microsoft/Phi-4-mini-instruct": dict(config=dict(n_embd=32, n_head=4, n_kv_heads=2, rotary=0.75, tied=True,
                                                      vocab_size=200064), eos=[200020, 199999], bos=199999,
                                          end="<|end|>"),
}


def write_repo(d: Path, repo_id: str) -> torch.nn.Module:
    from lit_gpt.tokenizer import write_phi3_tokenizer, write_tiktoken_tokenizer

    spec = REPOS[repo_id]
    d.mkdir(parents=True)
    config = tiny_phi3_config(**spec["config"], n_layer=2, block_size=256, longrope=64)
    model = random_hf_model(config, seed=len(repo_id), dtype=torch.bfloat16)
    save_weights(hf_state_dict(model, "phi3"), d, "safetensors", shards=2)
    (d / "config.json").write_text(json.dumps(dict(hub_phi3_config_json(config), torch_dtype="bfloat16",
                                                   architectures=["Phi3ForCausalLM"]), indent=2, default=str))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": spec["bos"], "eos_token_id": spec["eos"],
                                                          "pad_token_id": spec["eos"][-1]}))
    name = repo_id.replace("/", "-")
    template = (DATA / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
    if "Phi-3.5" in repo_id:
        write_phi3_tokenizer(d, DATA / "llama.cpp" / "ggml-vocab-phi-3.gguf.xz", chat_template=template)
    else:
        write_tiktoken_tokenizer(d, DATA / "js-tiktoken" / "o200k_base.js.xz", "phi-4-mini", chat_template=template)
    return model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    server = HubServer()
    server.models = {}
    for repo_id in REPOS:
        d = root / repo_id.split("/")[1]
        server.models[repo_id] = write_repo(d, repo_id)
        server.add_repo(repo_id).add_revision(d)
    yield server
    server.close()


def run(hub, tmp_path: Path, script: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], env=env, cwd=tmp_path, input=stdin,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("repo_id", REPOS)
def test_the_tutorial_commands(hub, tmp_path, repo_id):
    from lit_gpt.load import load_model

    ckpt = f"checkpoints/{repo_id}"
    run(hub, tmp_path, "scripts/download.py", "--repo_id", repo_id, "--from_safetensors", "True")
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= {p.name for p in (tmp_path / ckpt).iterdir()}
    run(hub, tmp_path, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", ckpt)
    model = load_model(tmp_path / ckpt, dtype=torch.float32)
    idx = torch.randint(0, 32000, (1, 90))  # past original_max_position_embeddings (64): the long factors
    with torch.no_grad():
        expected = hub.models[repo_id].float()(idx).logits
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=1e-4)

    out = run(hub, tmp_path, "generate/base.py", "--prompt", "Alice: Can you tell me a joke?\\nBob:",
              "--checkpoint_dir", ckpt, "--max_new_tokens", "20").stdout
    assert out.startswith("Alice: Can you tell me a joke?\nBob:") and len(out) > len("Alice: Can you tell me a joke?\nBob:")

    chat = run(hub, tmp_path, "chat/base.py", "--checkpoint_dir", ckpt, "--max_new_tokens", "24", "--seed", "1",
               "--system", "Be brief.", stdin="Tell me a joke.\nAnd another one?\n\n")
    assert "Chat template: the checkpoint's own" in chat.stderr
    replies = chat.stdout.split(">> Reply: ")[1:]
    assert len(replies) == 2 and all(r.strip() for r in replies)
    assert REPOS[repo_id]["end"] not in chat.stdout and "<|assistant|>" not in chat.stdout
