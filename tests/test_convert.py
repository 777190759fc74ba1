"""Conversion both ways: bit-exact round trip, configs of every format, and every bad input."""

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_checkpoints import edit_config_json, hf_config_json, make_hf_checkpoint, tiny_hf_config, tiny_phi3_config
from memory_maps import mapping_of
from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.load import load_model
from lit_gpt.config import Config
from lit_gpt.utils import InvalidArgument, NeedsStep, UserError

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def lit_outputs(d: Path) -> list[str]:
    """Anything conversion may have written, finished or not."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(("lit_", ".lit_")))


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["phi", "phi-msft", "mixformer-sequential"])
def test_hf_lit_hf_round_trip_is_bit_exact(tmp_path, scheme):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = tmp_path / "src", tmp_path / "out"
    hf = make_hf_checkpoint(src, tiny_hf_config(n_embd=80, n_head=4, rotary=0.4), scheme=scheme, shards=2)
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(src))
    assert proc.returncode == 0, proc.stderr
    proc = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(src), "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr

    original = hf.state_dict()
    written = load_file(out / "model.safetensors")
    assert set(written) == set(original)
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype
        assert torch.equal(written[name], tensor), name

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning about the checkpoint fails the test
        reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = torch.randint(0, 51200, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(idx).logits, hf(idx).logits)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_dtype_option_casts_weights(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16", show_progress=False)
    sd = torch.load(tmp_path / "lit_model.pth", mmap=True, weights_only=True)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_conversion_shows_progress(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "converting" in proc.stderr and "tensor" in proc.stderr
    assert lit_outputs(tmp_path) == ["lit_config.json", "lit_model.pth"]


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("scheme", ["phi", "phi-msft", "mixformer-sequential"])
@pytest.mark.parametrize("name", ["phi-1", "phi-1_5", "phi-2"])
def test_hf_config_of_every_format_gives_the_named_config(tmp_path, scheme, name):
    named = Config.from_name(name)
    hf = tiny_hf_config(n_embd=named.n_embd, n_head=named.n_head, n_layer=named.n_layer,
                        rotary=named.rotary_percentage, block_size=2048, intermediate_size=named.intermediate_size)
    data = hf_config_json(hf, scheme)
    data["_name_or_path"] = f"microsoft/{name}"
    (tmp_path / "config.json").write_text(json.dumps(data, default=str))
    derived = Config.from_hf_config(tmp_path / "config.json")
    assert derived.name == name
    for field in ("n_layer", "n_head", "n_embd", "head_size", "n_query_groups", "rope_n_elem", "intermediate_size",
                  "block_size", "padded_vocab_size", "norm_eps", "rope_base"):
        assert getattr(derived, field) == getattr(named, field), field


def test_phi2_config_json_as_published(tmp_path):
    """The config.json microsoft/phi-2 ships today (transformers 4.37 era keys)."""
    published = {
        "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0,
        "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560, "initializer_range": 0.02,
        "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "phi",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.37.0", "use_cache": True,
        "vocab_size": 51200,
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    derived = Config.from_hf_config(tmp_path / "config.json")
    named = Config.from_name("phi-2")
    assert (derived.n_embd, derived.n_layer, derived.head_size, derived.rope_n_elem) == (2560, 32, 80, 32)
    assert derived.intermediate_size == named.intermediate_size


def test_lit_config_json_round_trip(tmp_path):
    config = Config.from_name("phi-2")
    config.to_json(tmp_path / "lit_config.json")
    assert Config.from_json(tmp_path / "lit_config.json") == config


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_missing_directory(tmp_path):
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "nope"))
    assert_one_line_error(proc, "does not exist", "scripts/download.py")


@pytest.mark.slow
def test_directory_without_weights_names_the_download_command(tmp_path):
    d = tmp_path / "microsoft" / "phi-2"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(d))
    assert_one_line_error(proc, "no weights", "python scripts/download.py --repo_id microsoft/phi-2")
    assert lit_outputs(d) == []


@pytest.mark.slow
def test_unknown_model_name_lists_the_supported_ones(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path), "--model_name", "phi-9")
    assert_one_line_error(proc, "phi-9", "phi-1, phi-1_5, phi-2")
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_unknown_dtype(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path), "--dtype", "int3")
    assert_one_line_error(proc, "int3", "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_weight_file_is_named(tmp_path, fmt, damage):
    make_hf_checkpoint(tmp_path, formats=(fmt,), tokenizer=False)
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        data = bytearray(path.read_bytes())
        data[:64] = os.urandom(64)
        path.write_bytes(bytes(data))
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, path.name, "download")
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_missing_shard_is_named(tmp_path):
    make_hf_checkpoint(tmp_path, shards=2, tokenizer=False)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, "model-00002-of-00002.safetensors", "download")


def _edit_weights(d: Path, edit) -> None:
    path = d / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.mark.slow
def test_missing_tensor_is_named(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    _edit_weights(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.fc2.bias"))
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, "model.layers.1.mlp.fc2.bias", "missing")
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_unexpected_tensor_is_named(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    _edit_weights(tmp_path, lambda sd: sd.update({"model.layers.2.mlp.fc1.weight": torch.zeros(4, 4)}))
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, "model.layers.2.mlp.fc1.weight", "unexpected")
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_shape_mismatch_is_found_before_anything_is_written(tmp_path):
    """The LM head comes last in the file; its shape is checked from the header before any writing."""
    make_hf_checkpoint(tmp_path, tokenizer=False)
    _edit_weights(tmp_path, lambda sd: sd.update({"lm_head.bias": torch.zeros(100)}))
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, "lm_head.bias", "shape (100,)", "(51200,)")
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_config_that_does_not_match_the_weights(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, "model.layers.0.mlp.fc1.weight", "does not match")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_bin_checkpoint_cannot_run_code(tmp_path):
    make_hf_checkpoint(tmp_path, formats=("bin",), tokenizer=False)
    marker = tmp_path / "pwned"
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["evil"] = _RunsCode(str(marker))
    torch.save(sd, tmp_path / "pytorch_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, "pytorch_model.bin", "could run code")
    assert not marker.exists()
    assert lit_outputs(tmp_path) == []


def test_interrupted_conversion_leaves_no_model_file(tmp_path):
    """Ctrl-C while tensors are being written: the temp file is removed, no lit_model.pth appears."""
    import lit_gpt.tensor_writer as tensor_writer

    make_hf_checkpoint(tmp_path, tokenizer=False)
    calls = {"n": 0}
    real_add = tensor_writer.IncrementalTensorWriter.add

    def add_then_interrupt(self, name, tensor):
        real_add(self, name, tensor)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    tensor_writer.IncrementalTensorWriter.add = add_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_hf_checkpoint(tmp_path, show_progress=False)
    finally:
        tensor_writer.IncrementalTensorWriter.add = real_add
    assert calls["n"] == 5
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_lit_checkpoint_without_config(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    (tmp_path / "lit_config.json").unlink()
    out = tmp_path / "out"
    proc = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(tmp_path), "--output_dir", str(out))
    assert_one_line_error(proc, "lit_config.json", "missing")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("content", ["{not json", '{"n_embd": "wide"}', "[1, 2]", '{"n_layer": -2}',
                                     '{"n_layer": true}', '{"n_head": 4.0}'])
def test_lit_checkpoint_with_malformed_config(tmp_path, content):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    (tmp_path / "lit_config.json").write_text(content)
    out = tmp_path / "out"
    proc = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(tmp_path), "--output_dir", str(out))
    assert_one_line_error(proc, "lit_config.json", "malformed")
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(UserError, match="malformed"):
        load_model(tmp_path)


@pytest.mark.slow
def test_lit_checkpoint_that_does_not_match_its_config(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    config = json.loads((tmp_path / "lit_config.json").read_text())
    config["n_layer"] = 3
    (tmp_path / "lit_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="transformer.h.2"):
        load_model(tmp_path)
    out = tmp_path / "out"
    proc = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(tmp_path), "--output_dir", str(out))
    assert_one_line_error(proc, "transformer.h.2", "missing")
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(("changes", "needle"), [
    (dict(num_hidden_layers="2"), 'num_hidden_layers is "2", not a positive integer'),
    (dict(num_hidden_layers=True), "num_hidden_layers is true, not a positive integer"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers is 2.0, not a positive integer"),
    (dict(num_hidden_layers=-2), "num_hidden_layers is -2, not a positive integer"),
    (dict(hidden_size=0), "hidden_size is 0, not a positive integer"),
    (dict(vocab_size=None), "lacks the key 'vocab_size'"),
    (dict(layer_norm_eps="1e-5"), 'layer_norm_eps is "1e-5", not a positive number'),
    (dict(max_position_embeddings=-1), "max_position_embeddings is -1"),
    (dict(hidden_size=66), "hidden_size 66 is not divisible by num_attention_heads 4"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    (dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 1.5}), "partial_rotary_factor is 1.5"),
    (dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0}), "partial_rotary_factor is 0"),
    (dict(rope_parameters={"rope_theta": "big"}), 'rope_theta is "big"'),
    (dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.2}), "makes 3 rotary dims"),
    (dict(rope_parameters=[1]), "rope_parameters is [1], not an object"),
])
def test_config_json_with_wrong_values_is_one_clear_error(tmp_path, changes, needle):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    edit_config_json(tmp_path, **changes)
    with pytest.raises(UserError) as info:
        Config.from_hf_config(tmp_path / "config.json")
    assert needle in str(info.value) and "config.json" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("scheme", ["phi-msft", "mixformer-sequential"])
@pytest.mark.parametrize(("changes", "needle"), [
    (dict(n_layer="24"), 'n_layer is "24", not a positive integer'),
    (dict(n_embd=-64), "n_embd is -64"),
    (dict(n_head_kv=3), "n_head 4 is not divisible by n_head_kv 3"),
    (dict(rotary_dim=17), "rotary_dim is 17, more than the head size 16"),
    (dict(layer_norm_epsilon=False), "layer_norm_epsilon is false"),
])
def test_old_config_json_formats_with_wrong_values(tmp_path, scheme, changes, needle):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json(tiny_hf_config(), scheme)))
    edit_config_json(tmp_path, **changes)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        Config.from_hf_config(tmp_path / "config.json")


@pytest.mark.parametrize("content", ["[1, 2]", '"phi"', "3"])
def test_config_json_that_is_not_an_object(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(UserError, match="not an object"):
        Config.from_hf_config(tmp_path / "config.json")


@pytest.mark.slow
@pytest.mark.parametrize(("changes", "needle"), [
    (dict(num_hidden_layers="2"), "num_hidden_layers"), (dict(hidden_size=-64), "hidden_size"),
])
def test_config_json_with_wrong_values_in_the_script(tmp_path, changes, needle):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    edit_config_json(tmp_path, **changes)
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, needle, "config.json")
    assert lit_outputs(tmp_path) == []


def test_config_json_with_absurd_sizes_fails_before_building_anything(tmp_path):
    """10**9 layers once built a name map for every one of them (a hang, with memory growing)."""
    for changes, needle in ((dict(num_hidden_layers=10 ** 9), "n_layer 2, not 1000000000"),
                            (dict(hidden_size=2 ** 40, num_attention_heads=2 ** 30), "n_embd 64, not 1099511627776"),
                            (dict(vocab_size=10 ** 12), "padded_vocab_size 51200, not 1000000000000")):
        make_hf_checkpoint(tmp_path, tokenizer=False)
        edit_config_json(tmp_path, **changes)
        with pytest.raises(UserError, match="does not match the weights beside it") as info:
            convert_hf_checkpoint(tmp_path, show_progress=False)
        assert needle in str(info.value)
        assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_config_json_with_absurd_layer_count_in_the_script(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    edit_config_json(tmp_path, num_hidden_layers=10 ** 9)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/convert_hf_checkpoint.py"), "--checkpoint_dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc, "config.json", "n_layer 2, not 1000000000")
    assert lit_outputs(tmp_path) == []


def test_weights_missing_a_middle_block_are_named(tmp_path):
    make_hf_checkpoint(tmp_path, tiny_hf_config(n_layer=3), tokenizer=False)
    _edit_weights(tmp_path, lambda sd: [sd.pop(n) for n in list(sd) if n.startswith("model.layers.1.")])
    with pytest.raises(UserError, match=r"model.layers.1.self_attn.dense.weight is missing .* blocks up to 2"):
        convert_hf_checkpoint(tmp_path, show_progress=False)


def test_named_config_of_another_size_says_what_the_weights_are(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    with pytest.raises(InvalidArgument, match="phi-2 does not match the weights") as info:
        convert_hf_checkpoint(tmp_path, model_name="phi-2", show_progress=False)
    assert "n_layer 2, not 32; n_embd 64, not 2560" in str(info.value)
    assert info.value.name == "model_name"
    # weights the size of another named config: that one is named
    from lit_gpt.config import configs

    configs.append(dict(name="phi-tiny", n_layer=2, n_head=4, n_embd=64, padded_vocab_size=51200))
    try:
        with pytest.raises(InvalidArgument, match=r"they are phi-tiny-sized \(n_layer 2, not 32; n_embd 64, not 2560\); "
                                                  r"use model_name phi-tiny"):
            convert_hf_checkpoint(tmp_path, model_name="phi-2", show_progress=False)
    finally:
        configs.pop()
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_named_config_of_another_size_in_the_script(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path), "--model_name", "phi-2")
    assert_one_line_error(proc, "--model_name phi-2 does not match the weights", "n_embd 64, not 2560",
                          "leave --model_name out")
    assert lit_outputs(tmp_path) == []


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_integer_weights_are_refused(tmp_path, fmt):
    make_hf_checkpoint(tmp_path, formats=(fmt,), tokenizer=False)
    if fmt == "safetensors":
        _edit_weights(tmp_path, lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"].to(torch.int64)}))
    else:
        sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
        sd["lm_head.weight"] = sd["lm_head.weight"].to(torch.int32)
        torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"tensor lm_head.weight in .* is int(64|32); Phi's weights are floating point"):
        convert_hf_checkpoint(tmp_path, show_progress=False)
    assert lit_outputs(tmp_path) == []


@pytest.mark.slow
def test_integer_weights_are_one_line_in_the_script(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    _edit_weights(tmp_path, lambda sd: sd.update({"model.layers.0.mlp.fc1.weight": torch.zeros(256, 64, dtype=torch.int8)}))
    proc = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path))
    assert_one_line_error(proc, "model.layers.0.mlp.fc1.weight", "int8", "floating point")
    assert lit_outputs(tmp_path) == []


@pytest.mark.parametrize(("content", "needle"), [
    ('{"n_layer": -2}', "n_layer=-2 is not positive"), ('{"n_layer": true}', "n_layer=true is not an integer"),
    ('{"n_embd": 2048.0}', "n_embd=2048.0 is not an integer"), ('{"bias": 1}', "bias=1 is not true or false"),
    ('{"rotary_percentage": 0}', "rotary_percentage=0 is not in (0, 1]"),
    ('{"norm_eps": "1e-5"}', 'norm_eps="1e-5" is not a number'), ('{"n_head": 3}', "n_embd=2048 is not divisible"),
    ('{"n_query_groups": 5}', "n_head=32 is not divisible by n_query_groups=5"),
    ('{"vocab_size": 60000}', "vocab_size=60000 is more than padded_vocab_size=51200"),
    ('{"hf_config": []}', "hf_config=[] is not an object"), ("[]", "not a JSON object"),
])
def test_lit_config_json_with_wrong_values(tmp_path, content, needle):
    (tmp_path / "lit_config.json").write_text(content)
    with pytest.raises(NeedsStep, match="malformed") as info:
        Config.from_json(tmp_path / "lit_config.json")
    assert needle in str(info.value) and info.value.step == "convert"


def test_lit_config_json_with_absurd_layer_count_fails_before_building_anything(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    config = json.loads((tmp_path / "lit_config.json").read_text())
    (tmp_path / "lit_config.json").write_text(json.dumps({**config, "n_layer": 10 ** 9}))
    with pytest.raises(NeedsStep, match="it holds 2 blocks but lit_config.json says n_layer=1000000000"):
        load_model(tmp_path)
    (tmp_path / "lit_config.json").write_text(json.dumps({**config, "n_embd": 2 ** 20, "n_head": 2 ** 16}))
    with pytest.raises(UserError, match=r"transformer.wte.weight has shape \(51200, 64\)"):
        load_model(tmp_path)


def test_lit_checkpoint_with_integer_weights(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    sd = torch.load(tmp_path / "lit_model.pth", weights_only=True)
    sd["lm_head.bias"] = sd["lm_head.bias"].to(torch.int64)
    torch.save(sd, tmp_path / "lit_model.pth")
    with pytest.raises(UserError, match="lm_head.bias is int64 .*, not floating point"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------- export over itself


def test_export_into_its_own_directory_is_refused(tmp_path):
    from lit_gpt.convert import convert_lit_checkpoint

    make_hf_checkpoint(tmp_path / "ckpt", tokenizer=False)
    convert_hf_checkpoint(tmp_path / "ckpt", show_progress=False)
    original = (tmp_path / "ckpt" / "config.json").read_bytes()
    for same in (tmp_path / "ckpt", tmp_path / "ckpt" / ".." / "ckpt" / "."):
        with pytest.raises(InvalidArgument, match="is the checkpoint directory .* itself") as info:
            convert_lit_checkpoint(tmp_path / "ckpt", same)
        assert info.value.name == "output_dir"
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    with pytest.raises(InvalidArgument):
        convert_lit_checkpoint(tmp_path / "link", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").read_bytes() == original


@pytest.mark.slow
def test_export_into_its_own_directory_in_the_script(tmp_path):
    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(tmp_path), "--output_dir",
                      str(tmp_path / "."))
    assert_one_line_error(proc, "--output_dir is the checkpoint directory", "config.json")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


MEASURE_PEAK = """
import re, sys
sys.path.insert(0, {root!r})
import torch
from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.load import expected_shapes
from lit_gpt.config import Config

expected_shapes(Config(n_layer=1, n_embd=8, n_head=1))  # one-time lazy imports (~80 MB) are not conversion memory

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to what is resident now
before = status("VmRSS")
if sys.argv[1] == "convert":
    convert_hf_checkpoint(sys.argv[2], show_progress=False)
elif sys.argv[1] in ("int8", "int4", "bf16"):
    from lit_gpt.load import load_model
    model = load_model(sys.argv[2], quantize=None if sys.argv[1] == "bf16" else sys.argv[1])
    print(sum(t.nbytes for t in list(model.parameters()) + list(model.buffers())))
else:  # control: reading the whole model must show up, or the measurement means nothing
    sd = torch.load(sys.argv[2] + "/lit_model.pth", weights_only=True)
print(status("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_conversion_memory_stays_near_one_tensor(tmp_path, fmt):
    """Peak resident memory grows by a small part of the model, not by the model (300 MB here)."""
    config = tiny_hf_config(n_embd=512, n_head=8, n_layer=24, vocab_size=1024)
    make_hf_checkpoint(tmp_path, config, formats=(fmt,), shards=2, tokenizer=False)
    model_bytes = sum(p.stat().st_size for p in tmp_path.glob(f"*.{fmt}"))
    assert model_bytes > 280e6

    def grown(mode: str) -> int:
        script = MEASURE_PEAK.format(root=str(ROOT))
        return int(subprocess.run([sys.executable, "-c", script, mode, str(tmp_path)],
                                  capture_output=True, text=True, check=True).stdout)

    converting = grown("convert")
    assert (tmp_path / "lit_model.pth").stat().st_size >= model_bytes * 0.99
    assert grown("control") > model_bytes * 0.9
    print(f"{fmt}: peak RSS grew by {converting / 1e6:.1f} MB converting {model_bytes / 1e6:.0f} MB")
    assert converting < model_bytes / 10


@pytest.mark.slow
@pytest.mark.parametrize("block", ["phi", "phi3"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load_memory_follows_the_result(tmp_path, mode, block):
    """Quantizing at load hands the float pages back: peak growth is near the quantized size, not float + quantized
    (the later family's block with a tied head too: the embedding is read whole to quantize it, then handed back)."""
    if block == "phi":
        config = tiny_hf_config(n_embd=512, n_head=8, n_layer=24, vocab_size=1024)
    else:
        config = tiny_phi3_config(n_embd=512, n_head=8, n_kv_heads=2, n_layer=24, vocab_size=8192,
                                  intermediate_size=1536, tied=True, rotary=0.75, longrope=16)
    make_hf_checkpoint(tmp_path, config, scheme=block, tokenizer=False)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16", show_progress=False)
    float_bytes = (tmp_path / "lit_model.pth").stat().st_size
    out = subprocess.run([sys.executable, "-c", MEASURE_PEAK.format(root=str(ROOT)), mode, str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.split()
    quantized_bytes, grown = int(out[0]), int(out[1])
    print(f"{mode}: peak grew by {grown / 1e6:.0f} MB for {quantized_bytes / 1e6:.0f} MB quantized, "
          f"{float_bytes / 1e6:.0f} MB bf16")
    assert quantized_bytes < float_bytes * 0.6
    # without handing pages back it would grow by about float_bytes + quantized_bytes
    assert grown < quantized_bytes + float_bytes / 2


def _thp_enabled() -> bool:
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return mode.is_file() and "[never]" not in mode.read_text()


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_load_moves_the_weights_onto_huge_pages(tmp_path, monkeypatch, quantize):
    """On the CPU the weights move into one mapping advised for transparent huge pages (the tied head with the
    embedding, as one tensor); the model computes the same logits as memory-mapped; LIT_GPT_HUGE_PAGES=0 keeps them
    where they are."""
    config = tiny_phi3_config(n_embd=256, n_head=4, n_kv_heads=2, n_layer=2, vocab_size=8192, intermediate_size=768,
                              tied=True)
    make_hf_checkpoint(tmp_path, config, scheme="phi3", tokenizer=False)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16", show_progress=False)
    idx = torch.randint(0, 8192, (1, 9))
    mapped = load_model(tmp_path, quantize=quantize, huge_pages=False)
    moved = load_model(tmp_path, quantize=quantize)
    tensors = [*moved.parameters(), *moved.buffers()]
    assert sum(t.nbytes for t in tensors) > 4 << 20
    mapping = mapping_of(moved.transformer.wte.weight.data_ptr())
    if _thp_enabled():
        begin, end = mapping["range"]
        assert all(begin <= t.data_ptr() and t.data_ptr() + t.nbytes <= end for t in tensors)
        assert "hg" in mapping["VmFlags"] and mapping["THPeligible"] == "1"  # advised, and eligible
        assert mapping["Rss"] != "0" and "hg" not in mapping_of(mapped.transformer.wte.weight.data_ptr())["VmFlags"]
    else:
        assert "hg" not in mapping["VmFlags"]
    if quantize is None:
        assert moved.lm_head.weight is moved.transformer.wte.weight
    with torch.inference_mode():
        assert torch.equal(moved(idx), mapped(idx))
    monkeypatch.setenv("LIT_GPT_HUGE_PAGES", "0")
    kept = load_model(tmp_path, quantize=quantize)
    assert "hg" not in mapping_of(kept.transformer.wte.weight.data_ptr())["VmFlags"]


@pytest.mark.slow
def test_bf16_load_onto_huge_pages_holds_the_model_once(tmp_path):
    """The copy onto huge pages hands each piece's file pages back: peak growth is the model's size, not twice it."""
    config = tiny_hf_config(n_embd=512, n_head=8, n_layer=24, vocab_size=1024)
    make_hf_checkpoint(tmp_path, config, tokenizer=False)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16", show_progress=False)
    out = subprocess.run([sys.executable, "-c", MEASURE_PEAK.format(root=str(ROOT)), "bf16", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.split()
    model_bytes, grown = int(out[0]), int(out[1])
    print(f"bf16: peak grew by {grown / 1e6:.0f} MB for {model_bytes / 1e6:.0f} MB")
    if _thp_enabled():  # copied: the whole model is resident once
        assert model_bytes * 0.9 < grown < model_bytes * 1.1
    else:  # left memory-mapped: nothing read yet
        assert grown < model_bytes / 10


def test_a_checkpoint_larger_than_a_private_mapping_may_be_loads_shared_and_read_only(tmp_path, monkeypatch):
    """Linux refuses a private (copy-on-write) mapping larger than RAM and swap (phi-4's 29 GB lit_model.pth on a
    24 GB machine: "Cannot allocate memory"); loading then maps the file shared, made read-only, and gives the same
    model. The refusal is injected: this machine's RAM is not to be exhausted by a test."""
    import mmap as mmap_module

    make_hf_checkpoint(tmp_path, tokenizer=False)
    convert_hf_checkpoint(tmp_path, dtype="bfloat16", show_progress=False)
    idx = torch.randint(0, 51200, (1, 7))
    with torch.inference_mode():
        expected = load_model(tmp_path)(idx)  # the model and its private mapping are gone after this line
    real_load = torch.load

    def load(path, *args, mmap=None, **kwargs):
        if mmap and torch.serialization.get_default_mmap_options() == mmap_module.MAP_PRIVATE:
            raise RuntimeError(f"unable to mmap 29319092321 bytes from file <{path}>: Cannot allocate memory (12)")
        return real_load(path, *args, mmap=mmap, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    model = load_model(tmp_path, huge_pages=False)  # (as a checkpoint larger than RAM is: it stays mapped)
    assert torch.serialization.get_default_mmap_options() == mmap_module.MAP_PRIVATE  # restored
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(tmp_path / "lit_model.pth"))]
    assert maps and all(fields[1].endswith("s") for fields in maps)  # shared
    assert any(fields[1] == "r--s" for fields in maps)  # the tensors' pages read-only
    with torch.inference_mode():
        assert torch.equal(model(idx), expected)
