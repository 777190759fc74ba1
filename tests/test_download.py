"""scripts/download.py against a loopback Hub (tests/hub_server.py).

No mocks of huggingface_hub: the script runs as a subprocess with HF_ENDPOINT pointing at a real HTTP server
on 127.0.0.1, and huggingface_hub's own client talks to it. The server counts the bytes it sends per file, so
the tests can tell what was fetched, and fetched again.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_checkpoints import make_hf_checkpoint, tiny_hf_config
from hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "download.py"
PHI2, PHI15 = "microsoft/phi-2", "microsoft/phi-1_5"
GATED, PRIVATE = "acme/gated-phi", "acme/private-phi"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX = "model.safetensors.index.json"
TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
             "special_tokens_map.json"}
CONFIGS = {"config.json", "generation_config.json"}
VOCAB = 4096  # keeps every weight file well under a megabyte


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback Hub, with repos built once per module. `hub.models` holds the transformers models."""
    root = tmp_path_factory.mktemp("hub")
    config = tiny_hf_config(n_embd=40, n_head=4, rotary=0.4, vocab_size=VOCAB)
    server = HubServer()
    models = {}
    # phi-2 today: two safetensors shards and their index, transformers' names; tag v1.0 is an older commit
    # with the remote-code names, as the repo had in late 2023
    models["phi-2-old"] = make_hf_checkpoint(root / "phi-2-old", config, scheme="phi-msft", shards=2, seed=1)
    models["phi-2"] = make_hf_checkpoint(root / "phi-2", config, shards=2)
    repo = server.add_repo(PHI2)
    server.phi2_old_sha = repo.add_revision(root / "phi-2-old", refs=("v1.0",))
    repo.add_revision(root / "phi-2", refs=("main",))
    # phi-1_5: one file as both .safetensors and .bin; its first commit held a MixFormer .bin only
    models["phi-1_5-old"] = make_hf_checkpoint(root / "phi-1_5-old", config, scheme="mixformer-sequential",
                                               formats=("bin",), seed=2)
    models["phi-1_5"] = make_hf_checkpoint(root / "phi-1_5", config, formats=("safetensors", "bin"), seed=3)
    repo = server.add_repo(PHI15)
    server.phi15_old_sha = repo.add_revision(root / "phi-1_5-old", refs=())
    repo.add_revision(root / "phi-1_5")
    server.add_repo(GATED, gated=True).add_revision(root / "phi-1_5")
    server.add_repo(PRIVATE, private=True).add_revision(root / "phi-1_5")
    server.add_token("hf_good", GATED, PRIVATE)
    server.add_token("hf_no_access")
    # repos that do not hold a Phi checkpoint
    for name, keep in (("no-config", {"model.safetensors", "tokenizer.json", "vocab.json"}),
                       ("no-weights", CONFIGS | TOKENIZER)):
        d = root / name
        d.mkdir()
        for f in keep:
            shutil.copy(root / "phi-1_5" / f, d / f)
        server.add_repo(f"acme/{name}").add_revision(d)
    d = root / "llama"
    shutil.copytree(root / "phi-1_5", d, ignore=shutil.ignore_patterns("*.bin"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 40}))
    server.add_repo("acme/llama").add_revision(d)
    server.root, server.models = root, models
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _fresh(request):
    if "hub" in request.fixturenames:
        request.getfixturevalue("hub").reset()


def hub_env(hub, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def download(hub, tmp_path, repo_id, *args, env=None, **extra) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(SCRIPT), "--repo_id", repo_id, "--checkpoint_dir", str(tmp_path / "checkpoints"),
            *args]
    return subprocess.run(argv, env=env or hub_env(hub, tmp_path, **extra), capture_output=True, text=True,
                          timeout=180)


def start_download(hub, tmp_path, repo_id, *args) -> subprocess.Popen:
    argv = [sys.executable, str(SCRIPT), "--repo_id", repo_id, "--checkpoint_dir", str(tmp_path / "checkpoints")]
    return subprocess.Popen(argv + list(args), env=hub_env(hub, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_in(d: Path) -> set[str]:
    """The checkpoint's files, without our bookkeeping under .cache."""
    return {p.name for p in d.iterdir() if p.is_file()}


def partials(d: Path) -> dict[str, int]:
    """Sizes of the partial files, by name. While a download runs, a small file can finish (and be
    renamed away) between the listing and its stat: it is then simply not partial any more."""
    part = d / ".cache" / "lit_gpt" / "partial"
    sizes = {}
    for p in part.glob("*.incomplete") if part.is_dir() else []:
        try:
            sizes[p.name.split(".safetensors")[0]] = p.stat().st_size
        except FileNotFoundError:
            pass
    return sizes


def size(hub, repo_dir: str, name: str) -> int:
    return (hub.root / repo_dir / name).stat().st_size


def assert_runs_like(hf_model, checkpoint_dir: Path) -> None:
    """The converted checkpoint computes what the transformers model it came from computes."""
    from lit_gpt.load import load_model

    model = load_model(checkpoint_dir)
    idx = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ listing


def test_without_repo_id_lists_the_supported_repos(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=hub_env(None, tmp_path), capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert_ok(proc)
    for repo_id in ("microsoft/phi-1", "microsoft/phi-1_5", "microsoft/phi-2"):
        assert repo_id in proc.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_help_documents_every_option(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert_ok(proc)
    for option in ("--repo_id", "--checkpoint_dir", "--from_safetensors", "--tokenizer_only", "--access_token",
                   "--revision", "--convert"):
        assert option in proc.stdout
    assert "HF_TOKEN" in proc.stdout and "resumes" in proc.stdout


# ------------------------------------------------------------------------------------------ what is fetched


@pytest.mark.slow
def test_phi2_sharded_safetensors_download_converts_and_runs(hub, tmp_path):
    from lit_gpt.convert import convert_hf_checkpoint

    proc = download(hub, tmp_path, PHI2)
    assert_ok(proc)
    ckpt = tmp_path / "checkpoints" / PHI2
    assert files_in(ckpt) == CONFIGS | TOKENIZER | {INDEX, *SHARDS}
    for name in files_in(ckpt):  # byte-identical to the repo, each fetched exactly once
        assert (ckpt / name).read_bytes() == (hub.root / "phi-2" / name).read_bytes()
        assert hub.bytes_served(PHI2, name) == size(hub, "phi-2", name), name
    assert not partials(ckpt)
    convert_hf_checkpoint(ckpt, show_progress=False)
    assert_runs_like(hub.models["phi-2"], ckpt)

    # a second run finds everything verified: no file is fetched again
    hub.reset_counts()
    proc = download(hub, tmp_path, PHI2)
    assert_ok(proc)
    assert hub.bytes_served(PHI2) == 0
    assert "0 B downloaded now" in proc.stderr


@pytest.mark.slow
def test_phi15_default_takes_safetensors_only_and_convert_flag_works(hub, tmp_path):
    proc = download(hub, tmp_path, PHI15, "--convert", "True")
    assert_ok(proc)
    ckpt = tmp_path / "checkpoints" / PHI15
    assert files_in(ckpt) == CONFIGS | TOKENIZER | {"model.safetensors", "lit_model.pth", "lit_config.json"}
    assert hub.bytes_served(PHI15, "pytorch_model.bin") == 0
    assert_runs_like(hub.models["phi-1_5"], ckpt)


@pytest.mark.parametrize("flag, weights, other", [("True", "model.safetensors", "pytorch_model.bin"),
                                                  ("False", "pytorch_model.bin", "model.safetensors")])
def test_from_safetensors_picks_one_kind(hub, tmp_path, flag, weights, other):
    proc = download(hub, tmp_path, PHI15, "--from_safetensors", flag)
    assert_ok(proc)
    ckpt = tmp_path / "checkpoints" / PHI15
    assert files_in(ckpt) == CONFIGS | TOKENIZER | {weights}
    assert hub.bytes_served(PHI15, weights) == size(hub, "phi-1_5", weights)
    assert hub.bytes_served(PHI15, other) == 0


@pytest.mark.slow
def test_missing_kind_falls_back_with_a_note_and_old_weights_are_replaced(hub, tmp_path):
    from lit_gpt.convert import convert_hf_checkpoint

    ckpt = tmp_path / "checkpoints" / PHI15
    assert_ok(download(hub, tmp_path, PHI15))
    assert "model.safetensors" in files_in(ckpt)
    # the first commit of phi-1_5 has a MixFormer .bin only
    proc = download(hub, tmp_path, PHI15, "--revision", hub.phi15_old_sha, "--from_safetensors", "True")
    assert_ok(proc)
    notes = [line for line in proc.stderr.splitlines() if "no safetensors" in line]
    assert len(notes) == 1 and "bin" in notes[0], proc.stderr
    # the safetensors of main are gone, or the converter would read them instead
    assert files_in(ckpt) == CONFIGS | TOKENIZER | {"pytorch_model.bin"}
    assert hub.bytes_served(PHI15, "model.safetensors") == size(hub, "phi-1_5", "model.safetensors")
    convert_hf_checkpoint(ckpt, show_progress=False)
    assert_runs_like(hub.models["phi-1_5-old"], ckpt)


@pytest.mark.slow
def test_new_weights_under_an_old_conversion_get_a_note(hub, tmp_path):
    ckpt = tmp_path / "checkpoints" / PHI15
    assert_ok(download(hub, tmp_path, PHI15, "--convert", "True"))
    proc = download(hub, tmp_path, PHI15)  # nothing new: nothing to say
    assert_ok(proc)
    assert "converted from earlier weights" not in proc.stderr
    proc = download(hub, tmp_path, PHI15, "--revision", hub.phi15_old_sha)
    assert_ok(proc)
    assert (f"note: {ckpt / 'lit_model.pth'} was converted from earlier weights; convert again with "
            f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {ckpt}`") in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("revision", ["v1.0", "sha"])
def test_revision_pins_an_older_commit(hub, tmp_path, revision):
    from lit_gpt.convert import convert_hf_checkpoint

    rev = hub.phi2_old_sha if revision == "sha" else revision
    assert_ok(download(hub, tmp_path, PHI2, "--revision", rev))
    ckpt = tmp_path / "checkpoints" / PHI2
    for name in SHARDS:
        assert (ckpt / name).read_bytes() == (hub.root / "phi-2-old" / name).read_bytes()
    resolved = [path for _, path, _ in hub.requests if "/resolve/" in path]
    assert resolved and all(hub.phi2_old_sha in path for path in resolved)  # every file from the pinned commit
    convert_hf_checkpoint(ckpt, show_progress=False)
    assert_runs_like(hub.models["phi-2-old"], ckpt)


def test_tokenizer_only(hub, tmp_path):
    proc = download(hub, tmp_path, PHI2, "--tokenizer_only", "True")
    assert_ok(proc)
    assert files_in(tmp_path / "checkpoints" / PHI2) == CONFIGS | TOKENIZER
    assert all(hub.bytes_served(PHI2, name) == 0 for name in SHARDS + [INDEX])


# ------------------------------------------------------------------------------------------- interruptions


@pytest.mark.slow
def test_dropped_connection_is_resumed_within_the_run(hub, tmp_path):
    hub.drop_after(PHI2, SHARDS[0], 200_000)
    assert_ok(download(hub, tmp_path, PHI2))
    ckpt = tmp_path / "checkpoints" / PHI2
    assert (ckpt / SHARDS[0]).read_bytes() == (hub.root / "phi-2" / SHARDS[0]).read_bytes()
    assert hub.bytes_served(PHI2, SHARDS[0]) == size(hub, "phi-2", SHARDS[0])  # nothing sent twice
    assert ("GET", "bytes=200000-") in {(m, r) for m, p, r in hub.requests if "/cdn/" in p}


@pytest.mark.slow
def test_rerun_after_a_failed_run_continues_where_it_stopped(hub, tmp_path):
    # the connection drops partway through the shard, and keeps dropping until the run gives up
    hub.drop_after(PHI2, SHARDS[0], 200_000, 0, 0, 0, 0)
    proc = download(hub, tmp_path, PHI2)
    assert_one_line_error(proc, SHARDS[0], "run the same command again to resume")
    ckpt = tmp_path / "checkpoints" / PHI2
    assert SHARDS[0] not in files_in(ckpt)  # never a truncated file under the real name
    assert partials(ckpt) == {"model-00001-of-00002": 200_000}

    hub.reset_counts()
    assert_ok(download(hub, tmp_path, PHI2))
    assert (ckpt / SHARDS[0]).read_bytes() == (hub.root / "phi-2" / SHARDS[0]).read_bytes()
    assert hub.bytes_served(PHI2, SHARDS[0]) == size(hub, "phi-2", SHARDS[0]) - 200_000
    for name in CONFIGS | TOKENIZER | {INDEX}:  # finished files were not fetched again
        assert hub.bytes_served(PHI2, name) == 0, name
    assert not partials(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_interrupted_process_resumes_on_the_next_run(hub, tmp_path, how):
    ckpt = tmp_path / "checkpoints" / PHI2
    hub.stall_after(PHI2, SHARDS[1], 300_000)
    proc = start_download(hub, tmp_path, PHI2)
    try:
        deadline = time.time() + 60
        while partials(ckpt).get("model-00002-of-00002") != 300_000:
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        if how == "kill":
            # meanwhile, a second download into the same directory is refused
            assert_one_line_error(download(hub, tmp_path, PHI2), "another download into")
            proc.kill()
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        hub.release.set()
    if how == "ctrl-c":
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert SHARDS[1] not in files_in(ckpt)
    assert (ckpt / SHARDS[0]).is_file()

    hub.reset_counts()
    assert_ok(download(hub, tmp_path, PHI2))
    assert (ckpt / SHARDS[1]).read_bytes() == (hub.root / "phi-2" / SHARDS[1]).read_bytes()
    assert hub.bytes_served(PHI2, SHARDS[1]) == size(hub, "phi-2", SHARDS[1]) - 300_000
    assert hub.bytes_served(PHI2, SHARDS[0]) == 0


# -------------------------------------------------------------------------------------------- verification


@pytest.mark.slow
def test_corrupted_transfer_is_deleted_and_a_rerun_fixes_it(hub, tmp_path):
    hub.corrupt(PHI2, SHARDS[1])
    proc = download(hub, tmp_path, PHI2)
    assert_one_line_error(proc, SHARDS[1], "did not match", "run the same command again")
    ckpt = tmp_path / "checkpoints" / PHI2
    assert SHARDS[1] not in files_in(ckpt) and not partials(ckpt)
    assert (ckpt / SHARDS[0]).is_file()

    hub.corrupt(PHI2, SHARDS[1], on=False)
    hub.reset_counts()
    assert_ok(download(hub, tmp_path, PHI2))
    assert (ckpt / SHARDS[1]).read_bytes() == (hub.root / "phi-2" / SHARDS[1]).read_bytes()
    assert hub.bytes_served(PHI2, SHARDS[0]) == 0


@pytest.mark.slow
def test_a_changed_local_file_is_detected_and_fetched_again(hub, tmp_path):
    assert_ok(download(hub, tmp_path, PHI2))
    ckpt = tmp_path / "checkpoints" / PHI2
    data = bytearray((ckpt / SHARDS[0]).read_bytes())
    data[1000] ^= 1  # same size, different content
    (ckpt / SHARDS[0]).write_bytes(bytes(data))
    hub.reset_counts()
    proc = download(hub, tmp_path, PHI2)
    assert_ok(proc)
    assert SHARDS[0] in proc.stderr  # it says the file differed
    assert (ckpt / SHARDS[0]).read_bytes() == (hub.root / "phi-2" / SHARDS[0]).read_bytes()
    assert hub.bytes_served(PHI2, SHARDS[0]) == size(hub, "phi-2", SHARDS[0])
    assert hub.bytes_served(PHI2, SHARDS[1]) == 0


def files_read(hub, tmp_path, ckpt: Path) -> set[str]:
    """Run the download and report which checkpoint files it opened for reading (a Python audit hook)."""
    argv = [str(SCRIPT), "--repo_id", PHI2, "--checkpoint_dir", str(tmp_path / "checkpoints")]
    code = ("import atexit, runpy, sys\n"
            "opened = set()\n"
            "def hook(event, args):\n"
            "    if event == 'open' and isinstance(args[0], str) and 'r' in str(args[1] or 'r'):\n"
            "        opened.add(args[0])\n"
            "sys.addaudithook(hook)\n"
            "atexit.register(lambda: print('\\n'.join(sorted(opened))))\n"
            f"sys.argv = {argv!r}\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=hub_env(hub, tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert_ok(proc)
    return {Path(line).name for line in proc.stdout.splitlines() if Path(line).parent == ckpt}


@pytest.mark.slow
def test_rerun_trusts_unchanged_files_and_rehashes_touched_ones(hub, tmp_path):
    assert_ok(download(hub, tmp_path, PHI2))
    ckpt = tmp_path / "checkpoints" / PHI2
    parsed = {"config.json", INDEX}  # read for the model type and the shard list, not hashed
    assert files_read(hub, tmp_path, ckpt) == parsed  # nothing hashed again: the records still hold
    os.utime(ckpt / SHARDS[0])  # same bytes, new mtime and ctime: the record no longer vouches for it
    hub.reset_counts()
    assert files_read(hub, tmp_path, ckpt) == parsed | {SHARDS[0]}  # hashed, found intact ...
    assert hub.bytes_served(PHI2) == 0  # ... and not downloaded again
    assert files_read(hub, tmp_path, ckpt) == parsed  # and recorded anew


@pytest.mark.slow
def test_offline_mode_uses_a_finished_download(hub, tmp_path):
    assert_ok(download(hub, tmp_path, PHI2))
    hub.reset_counts()
    proc = download(hub, tmp_path, PHI2, HF_HUB_OFFLINE="1")
    assert_ok(proc)
    assert "HF_HUB_OFFLINE" in proc.stderr and hub.requests == []
    proc = download(hub, tmp_path, PHI15, HF_HUB_OFFLINE="1")
    assert_one_line_error(proc, "HF_HUB_OFFLINE", "no complete download")
    assert hub.requests == []


# ------------------------------------------------------------------------------------------------- errors


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown repo", "unknown revision", "unreachable", "gated, no token",
                                  "gated, token without access", "invalid token", "private, no token"])
@pytest.mark.slow
def test_hub_errors_are_one_line_and_leave_nothing(hub, tmp_path, case):
    repo_id, args, env, needles = PHI2, [], {}, []
    if case == "unknown repo":
        repo_id, needles = "microsoft/phi-9", ["repository microsoft/phi-9 not found"]
    elif case == "unknown revision":
        args, needles = ["--revision", "no-such-branch"], ["revision 'no-such-branch' not found"]
    elif case == "unreachable":
        env, needles = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}, ["cannot reach", "HF_ENDPOINT",
                                                                               "HF_HUB_OFFLINE"]
    elif case == "gated, no token":
        repo_id, needles = GATED, ["is gated", "--access_token", "HF_TOKEN", "hf auth login"]
    elif case == "gated, token without access":
        repo_id, args, needles = GATED, ["--access_token", "hf_no_access"], ["is gated", "no access", "403"]
    elif case == "invalid token":
        args, needles = ["--access_token", "hf_bogus"], ["rejected the access token", "401"]
    elif case == "private, no token":
        repo_id, needles = PRIVATE, ["not found", "--access_token", "HF_TOKEN"]
    proc = download(hub, tmp_path, repo_id, *args, **env)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("repo_id, how", [(GATED, "flag"), (GATED, "env"), (PRIVATE, "flag")])
def test_gated_and_private_repos_with_a_token(hub, tmp_path, repo_id, how):
    if how == "flag":
        proc = download(hub, tmp_path, repo_id, "--access_token", "hf_good")
    else:
        proc = download(hub, tmp_path, repo_id, HF_TOKEN="hf_good")
    assert_ok(proc)
    assert "model.safetensors" in files_in(tmp_path / "checkpoints" / repo_id)


@pytest.mark.parametrize("repo_id, needle", [("acme/no-config", "no config.json"),
                                             ("acme/no-weights", "holds no model weights"),
                                             ("acme/llama", "'llama' model, not Phi")])
def test_repos_without_a_phi_checkpoint_are_refused(hub, tmp_path, repo_id, needle):
    proc = download(hub, tmp_path, repo_id)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "checkpoints").exists()
    assert hub.bytes_served(repo_id, "model.safetensors") == 0


def test_tokenizer_only_with_from_safetensors_is_an_error(tmp_path):
    proc = download(None, tmp_path, PHI2, "--tokenizer_only", "True", "--from_safetensors", "True")
    assert_one_line_error(proc, "--tokenizer_only", "--from_safetensors")


def test_convert_with_tokenizer_only_is_an_error(tmp_path):
    proc = download(None, tmp_path, PHI2, "--tokenizer_only", "True", "--convert", "True")
    assert_one_line_error(proc, "--convert", "--tokenizer_only")
    assert not (tmp_path / "checkpoints").exists()


def test_not_enough_free_space_is_found_before_the_weights(hub, tmp_path):
    argv = [str(SCRIPT), "--repo_id", PHI2, "--checkpoint_dir", str(tmp_path / "checkpoints")]
    code = ("import runpy, shutil, sys\n"
            "shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 100_000, 100_000)\n"
            f"sys.argv = {argv!r}\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=hub_env(hub, tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert_one_line_error(proc, "not enough disk space", "97.7 KiB")
    assert all(hub.bytes_served(PHI2, name) == 0 for name in SHARDS + ["tokenizer.json"])


@pytest.mark.slow
def test_disk_full_during_the_download(hub, tmp_path):
    from lit_gpt.transfer import RemoteFile, partial_path

    ckpt = tmp_path / "checkpoints" / PHI2
    data = (hub.root / "phi-2" / SHARDS[1]).read_bytes()
    partial = partial_path(ckpt, RemoteFile(SHARDS[1], len(data), hashlib.sha256(data).hexdigest(), None))
    partial.parent.mkdir(parents=True)
    partial.symlink_to("/dev/full")  # every write there fails with ENOSPC
    proc = download(hub, tmp_path, PHI2)
    assert_one_line_error(proc, "No space left on device", "run the same command again")
    assert SHARDS[1] not in files_in(ckpt)

    partial.unlink()  # space freed
    hub.reset_counts()
    assert_ok(download(hub, tmp_path, PHI2))
    assert (ckpt / SHARDS[1]).read_bytes() == data
    assert hub.bytes_served(PHI2, SHARDS[0]) == 0


def test_the_download_imports_neither_torch_nor_the_converter(tmp_path):
    """Neither the module nor the script (without --convert): torch alone takes seconds to import."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(SCRIPT)!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"  # (puts the repo on sys.path)
            "import lit_gpt.download\n"
            "assert not {'torch', 'lit_gpt.convert', 'lit_gpt.load'} & set(sys.modules), sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=hub_env(None, tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert_ok(proc)
    assert "microsoft/phi-2" in proc.stdout


# ----------------------------------------------------------------------------------------- the server itself


@pytest.mark.slow
def test_loopback_hub_serves_huggingface_hubs_own_downloads(hub, tmp_path):
    """snapshot_download and hf_hub_download (HEAD, 302 to the CDN, tree, X-Linked-*) work against the server."""
    code = ("import sys\n"
            "from huggingface_hub import HfApi, hf_hub_download, snapshot_download\n"
            f"d = snapshot_download({PHI2!r}, local_dir=sys.argv[1], allow_patterns=['*.json', '*.safetensors'])\n"
            f"f = hf_hub_download({PHI15!r}, 'model.safetensors', cache_dir=sys.argv[2])\n"
            f"info = HfApi().get_paths_info({PHI2!r}, [{SHARDS[0]!r}])[0]\n"
            "print(info.lfs.sha256, info.size)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "snap"), str(tmp_path / "cache")],
                          env=hub_env(hub, tmp_path), capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    data = (hub.root / "phi-2" / SHARDS[0]).read_bytes()
    assert proc.stdout.split() == [hashlib.sha256(data).hexdigest(), str(len(data))]
    assert (tmp_path / "snap" / SHARDS[0]).read_bytes() == data
    assert (tmp_path / "snap" / INDEX).is_file() and not (tmp_path / "snap" / "merges.txt").exists()


# ------------------------------------------------------------------------------- mirrors that list names only


def state_records(ckpt: Path) -> dict:
    """What the download recorded for each file: its size and the hash it was verified against."""
    return json.loads((ckpt / ".cache" / "lit_gpt" / "download.json").read_text())["files"]


@pytest.mark.slow
def test_a_listing_without_sizes_downloads_the_same_verified_files(hub, tmp_path):
    assert_ok(download(hub, tmp_path / "hub", PHI2))
    hub.sizes_in_info = False  # file names only, no size, blobId or LFS info: sizes and hashes come from HEADs
    hub.reset_counts()
    assert_ok(download(hub, tmp_path / "mirror", PHI2))
    from_hub, from_mirror = (tmp_path / where / "checkpoints" / PHI2 for where in ("hub", "mirror"))
    assert files_in(from_mirror) == files_in(from_hub) == CONFIGS | TOKENIZER | {INDEX, *SHARDS}
    for name in files_in(from_hub):
        assert (from_mirror / name).read_bytes() == (from_hub / name).read_bytes() == (
            hub.root / "phi-2" / name).read_bytes()
    # verified against the same sizes and hashes: sha256 for the LFS files, the git blob id for the others
    assert state_records(from_mirror) == state_records(from_hub)
    assert state_records(from_mirror)[SHARDS[0]]["sha256"] == hashlib.sha256(
        (hub.root / "phi-2" / SHARDS[0]).read_bytes()).hexdigest()
    heads = sorted(path.rsplit("/", 1)[1] for method, path, _ in hub.requests if method == "HEAD")
    assert heads == sorted(files_in(from_hub))  # one HEAD per file, nothing more


def test_a_listing_without_sizes_still_verifies_what_arrives(hub, tmp_path):
    hub.sizes_in_info = False
    hub.corrupt(PHI15, "model.safetensors")
    proc = download(hub, tmp_path, PHI15)
    assert_one_line_error(proc, "model.safetensors", "did not match")
    assert "model.safetensors" not in files_in(tmp_path / "checkpoints" / PHI15)


def test_a_mirror_that_publishes_no_hash_is_refused(hub, tmp_path):
    hub.sizes_in_info = False
    hub.intercept("/resolve/", 200, b"{}", content_type="application/json")  # the HEAD of config.json: no ETag
    proc = download(hub, tmp_path, PHI2)
    assert_one_line_error(proc, "no size or no hash for config.json of microsoft/phi-2", "could not be verified")
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------ plain HTTP errors: access, not found, later


PLAIN_ERRORS = {  # case -> (where, status, flags, needles); plain: no X-Error-Code, as from a proxy or a mirror
    "403 for the repo": ("/api/models/", 403, [], ["denied access to microsoft/phi-2 without a token (403",
                                                   "--access_token", "HF_TOKEN"]),
    "403 for the repo, with a token": ("/api/models/", 403, ["--access_token", "hf_good"],
                                       ["denied access to microsoft/phi-2 with this token (403", "--access_token"]),
    "401 for a file": ("/resolve/", 401, [], ["denied access to config.json of microsoft/phi-2 without a token "
                                              "(401", "--access_token"]),
    "401 for a file, with a token": ("/resolve/", 401, ["--access_token", "hf_good"],
                                     ["the Hub rejected the access token (401", "--access_token"]),
    "404 for the repo": ("/api/models/", 404, [], ["repository microsoft/phi-2 not found", "(404",
                                                   "check the repo id"]),
    "404 for the revision": ("/api/models/", 404, ["--revision", "v1.0"],
                             ["microsoft/phi-2@v1.0 not found", "(404", "check the repo id and the revision"]),
    "404 for a file": ("/resolve/", 404, [], ["config.json of microsoft/phi-2 not found", "(404",
                                              "although the repo lists it"]),
    "503 for the repo": ("/api/models/", 503, [], ["the Hub answered 503 Service Unavailable for microsoft/phi-2",
                                                   "try again later", "a re-run resumes"]),
    "429 for a file": ("/resolve/", 429, [], ["the Hub answered 429 Too Many Requests for config.json of "
                                              "microsoft/phi-2", "try again later"]),
    "502 for a file": ("/resolve/", 502, [], ["the Hub answered 502 Bad Gateway for config.json", "try again later"]),
}


def some_fast(cases, fast: set) -> list:
    """The cases, those not in `fast` marked slow: one of each kind keeps the fast tier fast."""
    return [pytest.param(case, marks=() if case in fast else pytest.mark.slow) for case in cases]


@pytest.mark.parametrize("case", some_fast(PLAIN_ERRORS, {"403 for the repo", "404 for a file", "503 for the repo"}))
def test_plain_http_errors_say_access_not_found_or_later(hub, tmp_path, case):
    where, status, flags, needles = PLAIN_ERRORS[case]
    hub.intercept(where, status, b"Sorry.")
    proc = download(hub, tmp_path, PHI2, *flags)
    line = assert_one_line_error(proc, *needles)
    if status in (401, 403, 404):
        assert "try again later" not in line
    assert not (tmp_path / "checkpoints").exists()


def sha256_of(hub, shard: str) -> str:
    """The sha256 of a phi-2 shard, which names it on the CDN."""
    return hashlib.sha256((hub.root / "phi-2" / shard).read_bytes()).hexdigest()


@pytest.mark.parametrize("status, needles", [(404, ["model-00002-of-00002.safetensors of microsoft/phi-2 not found",
                                                    "although the repo lists it"]),
                                             (403, ["denied access to model-00002-of-00002.safetensors of "
                                                    "microsoft/phi-2 without a token (403"])])
def test_plain_errors_from_the_cdn_name_the_file(hub, tmp_path, status, needles):
    hub.intercept(f"/cdn/{sha256_of(hub, SHARDS[1])}", status)
    proc = download(hub, tmp_path, PHI2)
    assert_one_line_error(proc, *needles)
    ckpt = tmp_path / "checkpoints" / PHI2
    assert SHARDS[1] not in files_in(ckpt) and SHARDS[0] in files_in(ckpt)


@pytest.mark.slow
def test_server_errors_while_downloading_are_retried_then_say_later_and_a_rerun_resumes(hub, tmp_path):
    hub.intercept(f"/cdn/{sha256_of(hub, SHARDS[1])}", 503, times=4)  # the GET and its 3 retries
    proc = download(hub, tmp_path, PHI2)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (after huggingface_hub's own "Retrying in 1s" warnings)
    assert last.startswith("error: the Hub answered 503 Service Unavailable for model-00002-of-00002.safetensors "
                           "of microsoft/phi-2")
    assert "try again later (a re-run resumes where this one stopped)" in last
    ckpt = tmp_path / "checkpoints" / PHI2
    assert SHARDS[1] not in files_in(ckpt) and SHARDS[0] in files_in(ckpt)

    hub.reset_counts()
    assert_ok(download(hub, tmp_path, PHI2))
    assert (ckpt / SHARDS[1]).read_bytes() == (hub.root / "phi-2" / SHARDS[1]).read_bytes()
    assert hub.bytes_served(PHI2) == size(hub, "phi-2", SHARDS[1])  # only what the failed run lacked


@pytest.mark.parametrize("how, needles", [
    pytest.param("hang", ["did not answer in time", "try again later"], marks=pytest.mark.slow),
    ("short", ["broke the connection", "try again later"])])
def test_an_unfinished_answer_is_transient(hub, tmp_path, how, needles):
    hub.intercept("/api/models/", 200, b'{"id": "microsoft/phi-2", "sib', content_type="application/json",
                  how=how)
    proc = download(hub, tmp_path, PHI2, HF_HUB_ETAG_TIMEOUT="1")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------- malformed answers


MALFORMED = {
    "truncated": b'{"id": "microsoft/phi-2", "sha": "0123456789abcdef", "siblings": [{"rfilename": "conf',
    "a web page": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    "a list": b'[{"rfilename": "config.json"}]',
    "no files": b'{"id": "microsoft/phi-2", "sha": "0123456789abcdef"}',
    "files not a list": b'{"id": "microsoft/phi-2", "siblings": "config.json"}',
    "a file without a name": b'{"id": "microsoft/phi-2", "siblings": [{"size": 10}]}',
    "a size that is text": b'{"id": "microsoft/phi-2", "siblings": [{"rfilename": "config.json", "size": "ten"}]}',
    "a commit that is a number": b'{"id": "microsoft/phi-2", "sha": 7, "siblings": []}',
}


@pytest.mark.parametrize("case", some_fast(MALFORMED, {"truncated", "a file without a name"}))
def test_a_malformed_repo_info_is_one_line(hub, tmp_path, case):
    hub.intercept("/api/models/", 200, MALFORMED[case], content_type="application/json")
    proc = download(hub, tmp_path, PHI2)
    assert_one_line_error(proc, "the Hub's answer for microsoft/phi-2 is not valid JSON", hub.url)
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------- OS errors


@pytest.mark.parametrize("case", some_fast(["org is a file", "repo dir is a file", "checkpoint dir is a file",
                                            ".cache is a file", "config.json is a directory"],
                                           {"org is a file", "config.json is a directory"}))
def test_files_and_directories_in_the_way_are_one_line(hub, tmp_path, case):
    checkpoints = tmp_path / "checkpoints"
    ckpt = checkpoints / PHI2
    in_the_way = {"org is a file": ckpt.parent, "repo dir is a file": ckpt, "checkpoint dir is a file": checkpoints,
                  ".cache is a file": ckpt / ".cache", "config.json is a directory": ckpt / "config.json"}[case]
    in_the_way.parent.mkdir(parents=True, exist_ok=True)
    if case == "config.json is a directory":
        in_the_way.mkdir()
        needles = [f"{in_the_way} is a directory, where the download puts a file"]
    else:
        in_the_way.write_text("not a directory")
        needles = [f"{in_the_way} is a file, where", "needs a directory", "choose another checkpoint directory"]
    before = sorted(p for p in checkpoints.rglob("*"))
    assert_one_line_error(download(hub, tmp_path, PHI2), *needles)
    after = sorted(p for p in checkpoints.rglob("*") if ".cache" not in p.relative_to(checkpoints).parts)
    assert after == [p for p in before if ".cache" not in p.relative_to(checkpoints).parts]  # nothing new, ...
    if in_the_way.is_file():
        assert in_the_way.read_text() == "not a directory"  # ... nothing changed


# Root ignores permission bits through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. Dropped from the bounding set,
# they are gone from the program exec'd next, for which the bits then hold as for any other user.
WITHOUT_ROOT_POWERS = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if any(libc.prctl(24, cap, 0, 0, 0) for cap in (1, 2)):  # PR_CAPBSET_DROP
    sys.exit(77)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def download_as_a_user(hub, tmp_path, repo_id, *args) -> subprocess.CompletedProcess:
    """`download`, subject to permission bits even when the tests run as root (as they do in CI)."""
    argv = [str(SCRIPT), "--repo_id", repo_id, "--checkpoint_dir", str(tmp_path / "checkpoints"), *args]
    if os.geteuid() == 0:
        argv = ["-c", WITHOUT_ROOT_POWERS] + argv
    proc = subprocess.run([sys.executable, *argv], env=hub_env(hub, tmp_path), capture_output=True, text=True,
                          timeout=120)
    if proc.returncode == 77:
        pytest.skip("running as root without CAP_SETPCAP: cannot drop the capabilities that let root ignore "
                    "permission bits")
    return proc


@pytest.mark.parametrize("case", ["read-only checkpoint dir", "read-only repo dir", "unreadable org dir"])
def test_permission_denied_is_one_line_and_writes_nothing(hub, tmp_path, case):
    checkpoints = tmp_path / "checkpoints"
    ckpt = checkpoints / PHI2
    ckpt.mkdir(parents=True)
    locked = {"read-only checkpoint dir": (checkpoints, 0o555), "read-only repo dir": (ckpt, 0o555),
              "unreadable org dir": (ckpt.parent, 0o000)}[case]
    if case == "read-only checkpoint dir":
        ckpt.rmdir()
        ckpt.parent.rmdir()
    locked[0].chmod(locked[1])
    try:
        proc = download_as_a_user(hub, tmp_path, PHI2, "--tokenizer_only", "True")
    finally:
        locked[0].chmod(0o755)
    assert_one_line_error(proc, "permission denied for", "fix the permissions or choose another checkpoint "
                                                         "directory")
    assert sorted(checkpoints.rglob("*")) == ([] if case == "read-only checkpoint dir" else [ckpt.parent, ckpt])


def test_an_unreadable_downloaded_file_is_one_line_and_kept(hub, tmp_path):
    ckpt = tmp_path / "checkpoints" / PHI2
    assert_ok(download(hub, tmp_path, PHI2, "--tokenizer_only", "True"))
    os.utime(ckpt / "tokenizer.json")  # the record no longer vouches for it: the next run reads it to hash it
    (ckpt / "tokenizer.json").chmod(0)
    proc = download_as_a_user(hub, tmp_path, PHI2, "--tokenizer_only", "True")
    assert_one_line_error(proc, f"permission denied for {ckpt / 'tokenizer.json'}")
    (ckpt / "tokenizer.json").chmod(0o644)
    assert (ckpt / "tokenizer.json").read_bytes() == (hub.root / "phi-2" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_a_conversion_that_cannot_write_is_one_line_and_keeps_the_download(hub, tmp_path):
    ckpt = tmp_path / "checkpoints" / PHI15
    (ckpt / "lit_model.pth").mkdir(parents=True)  # where the conversion puts its file
    proc = download(hub, tmp_path, PHI15, "--convert", "True")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (after the download's summary and the conversion's progress)
    assert last.startswith(f"error: cannot convert the checkpoint in {ckpt}: {ckpt / 'lit_model.pth'}: Is a "
                           "directory; fix that and run `python scripts/convert_hf_checkpoint.py --checkpoint_dir "
                           f"{ckpt}`"), last
    assert files_in(ckpt) - {"lit_config.json"} == CONFIGS | TOKENIZER | {"model.safetensors"}  # the download
    assert (ckpt / "lit_model.pth").is_dir() and not [p for p in ckpt.iterdir() if ".tmp" in p.name]
    hub.reset_counts()
    assert_ok(download(hub, tmp_path, PHI15))  # the download stands: nothing to fetch again
    assert hub.bytes_served(PHI15) == 0
