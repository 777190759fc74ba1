"""Download a Phi checkpoint (config, tokenizer, weights) from the Hugging Face Hub; resumable and verified."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt.cli import run_cli
from lit_gpt.download import SUPPORTED_REPO_IDS, TokenNeeded, download
from lit_gpt.files import LIT_CONFIG, LIT_MODEL
from lit_gpt.transfer import DISK_FULL
from lit_gpt.utils import UserError


def main(
    repo_id: Optional[str] = None,
    checkpoint_dir: Path = Path("checkpoints"),
    from_safetensors: Optional[bool] = None,
    tokenizer_only: bool = False,
    access_token: Optional[str] = None,
    revision: Optional[str] = None,
    convert: bool = False,
) -> None:
    """Download a Phi checkpoint from the Hub into checkpoint_dir/<org>/<name>; a re-run resumes, files are verified.

    Fetches config.json, generation_config.json, the tokenizer files and the weights, and nothing else.
    Re-running after an interruption resumes where it stopped; every file is checked against the size
    and hash the Hub publishes before it is kept. HF_TOKEN, HF_ENDPOINT (a mirror), HF_HUB_OFFLINE (use a
    finished download without the network), HF_HUB_DISABLE_PROGRESS_BARS, and HF_HUB_ETAG_TIMEOUT and
    HF_HUB_DOWNLOAD_TIMEOUT (seconds to wait for the Hub's answers and for file bytes) are honored.

    Args:
        repo_id: The repository on the Hub, e.g. microsoft/phi-2 (also microsoft/phi-1, microsoft/phi-1_5, or any
            fine-tune or mirror in one of their formats). Leave it out to list the supported repo ids.
        checkpoint_dir: Where checkpoints live; the files go into checkpoint_dir/<org>/<name>.
        from_safetensors: Which weights to fetch: True for *.safetensors, False for *.bin. By default the
            safetensors when the repo has them, else the .bin files. Only one kind is ever downloaded; when the
            asked-for kind is missing the other is taken, with a note.
        tokenizer_only: Fetch only the tokenizer files (and config.json, generation_config.json), no weights.
        access_token: A Hugging Face token, for gated or private repos. By default the HF_TOKEN environment
            variable or the token saved by `hf auth login` is used.
        revision: A branch, tag or commit hash to download (default: the repo's main branch).
        convert: Convert the checkpoint into lit_model.pth + lit_config.json right after the download.
    """
    if repo_id is None:
        print("Supported repo ids (fine-tunes and mirrors of them work too):")
        for name in SUPPORTED_REPO_IDS:
            print(f"  {name}")
        print("Download one with: python scripts/download.py --repo_id microsoft/phi-2")
        return
    if tokenizer_only and from_safetensors is not None:
        raise UserError("--tokenizer_only fetches no weights, so it cannot be combined with --from_safetensors")
    if tokenizer_only and convert:
        raise UserError("--convert needs the weights, so it cannot be combined with --tokenizer_only")
    try:
        done = download(repo_id, checkpoint_dir, from_safetensors, tokenizer_only, access_token, revision,
                        space_for_conversion=convert)
    except TokenNeeded as e:
        raise UserError(e.naming("--access_token")) from e
    if convert:
        convert_download(done.local_dir)
    elif done.weights and done.fetched and (done.local_dir / LIT_MODEL).is_file():
        # the weights may have changed under a lit_model.pth that the other scripts would go on loading
        print(f"note: {done.local_dir / LIT_MODEL} was converted from earlier weights; convert again with "
              f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {done.local_dir}`", file=sys.stderr)


def convert_download(local_dir: Path) -> None:
    from lit_gpt.convert import convert_hf_checkpoint  # imports torch: only when asked to convert

    try:
        out = convert_hf_checkpoint(local_dir)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise UserError(f"cannot write the converted checkpoint in {local_dir}: {e.strerror}; free some "
                            "space and run `python scripts/convert_hf_checkpoint.py` on it")
        if e.errno is None:
            raise
        # (the download itself is complete and verified: only the conversion needs doing again)
        raise UserError(f"cannot convert the checkpoint in {local_dir}: {e.filename2 or e.filename}: {e.strerror}; "
                        f"fix that and run `python scripts/convert_hf_checkpoint.py --checkpoint_dir {local_dir}`")
    print(f"converted: wrote {out} and {out.with_name(LIT_CONFIG)}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
