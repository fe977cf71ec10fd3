"""``daco publish OUT --repo-id ORG/NAME``: validate an output folder, upload it as a Hub dataset.

The folder is checked first (``transforms.write.validate_output_folder``: schemas,
dimensions, finite directions, counts against metadata.json, the card); a bad
folder is refused with the file and the reason, exit status 2: among them a folder an
interrupted build left (``_INCOMPLETE``) and a symbolic link (docs/reliability.md). The
folder may be local or on a Beam filesystem (gs://). Uploaded: README.md,
metadata.json, concepts.parquet, stimuli/, dictionary/ and deadletter/ (the
embeddings/ folder stays local).

Upload: up to ``MAX_FILES_ONE_COMMIT`` files (the Hub's recommended commit size,
"< 100 files") go in one commit (``create_commit``); a larger folder goes through
``upload_folder``, which in huggingface_hub >= 1.0 with hf_xet is the resumable
large-folder upload (several commits; re-running the command resumes it).
``--sae DIR`` (a finished ``daco train-sae`` folder) also uploads the SAEs beside the
dataset, under ``sae/`` of the same repo, in a commit of their own; their card is
rewritten to say where they are.

``--dry-run`` prints the files, their sizes, the upload plan and the card, and
imports nothing that talks to the network.
"""

HELP = "Validate an output folder and upload it to the Hugging Face Hub as a dataset repo."

#: Above this many files the upload is split into several commits (Hub guidance: < 100 files per commit).
MAX_FILES_ONE_COMMIT = 100


def add_arguments(parser):
    parser.add_argument("out", help="output folder of `daco build` (local path or gs:// URL)")
    parser.add_argument("--repo-id", required=True, help="Hub dataset repo, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created when absent; default: main)")
    parser.add_argument("--sae", default=None, metavar="DIR",
                        help="also upload the SAEs of `daco train-sae` (DIR) under sae/ of the same repo")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print what would be uploaded, touching no network")


def _size(n: int) -> str:
    """Bytes in a human unit (B, KiB, MiB, GiB)."""
    if n < 1024:
        return f"{n:,} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"


def _plan(n_files: int) -> str:
    if n_files <= MAX_FILES_ONE_COMMIT:
        return "one commit (create_commit)"
    return f"resumable multi-commit upload (upload_folder; more than {MAX_FILES_ONE_COMMIT} files)"


SAE_PREFIX = "sae"


def _sae_location(args) -> str:
    return (f"https://huggingface.co/datasets/{args.repo_id}/tree/{args.revision or 'main'}/{SAE_PREFIX}"
            f" (folder `{SAE_PREFIX}/` of the dataset repo `{args.repo_id}`)")


def _upload_sae(args, files, card: str) -> str:
    """Upload a train-sae folder under sae/ in one commit, its card replaced by ``card``; the commit URL."""
    from pathlib import Path

    from huggingface_hub import CommitOperationAdd, HfApi

    from pipeline.train_sae import CARD

    operations = [CommitOperationAdd(path_in_repo=f"{SAE_PREFIX}/{f.as_posix()}",
                                     path_or_fileobj=card.encode() if str(f) == CARD else str(Path(args.sae) / f))
                  for f in files]
    info = HfApi().create_commit(args.repo_id, operations, commit_message=f"Upload DACO SAEs ({len(files)} files)",
                                 repo_type="dataset", revision=args.revision)
    return getattr(info, "commit_url", str(info))


def _upload(args, files) -> str:
    """Create the repo (and branch) and upload ``files``; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from transforms import fileio

    remote = fileio.is_remote(args.out)
    if remote and len(files) > MAX_FILES_ONE_COMMIT:
        raise ValueError(f"{args.out} holds {len(files)} files to upload; above {MAX_FILES_ONE_COMMIT} the resumable "
                         "upload needs a local folder: copy it first (gcloud storage cp -r) and publish the copy")
    api = HfApi()
    api.create_repo(args.repo_id, repo_type="dataset", private=args.private, exist_ok=True)
    if args.revision:
        api.create_branch(args.repo_id, branch=args.revision, repo_type="dataset", exist_ok=True)
    message = f"Upload DACO-400K ({len(files)} files) with daco publish"
    if len(files) <= MAX_FILES_ONE_COMMIT:
        operations = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=fileio.read_bytes(fileio.join(args.out, f.path))
                                         if remote else fileio.join(args.out, f.path)) for f in files]
        info = api.create_commit(args.repo_id, operations, commit_message=message, repo_type="dataset",
                                 revision=args.revision)
    else:
        info = api.upload_folder(repo_id=args.repo_id, folder_path=args.out, repo_type="dataset",
                                 revision=args.revision, commit_message=message,
                                 allow_patterns=[f.path for f in files])
    return getattr(info, "commit_url", str(info))


def run(args, beam_args):
    import sys
    from pathlib import Path

    from transforms import fileio
    from transforms.write import FolderInvalid, validate_output_folder

    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        print(f"daco publish: --repo-id must be ORG/NAME, got {args.repo_id!r}", file=sys.stderr)
        return 2
    try:
        files = validate_output_folder(args.out)
    except FolderInvalid as exc:
        print(f"daco publish: refusing to publish {args.out}: {exc}", file=sys.stderr)
        return 2
    sae_files = None
    if args.sae:
        from pipeline.train_sae import published_card, sae_folder_files

        try:
            sae_files = sae_folder_files(args.sae)
        except SystemExit as exc:
            print(f"daco publish: refusing to publish {exc}", file=sys.stderr)
            return 2
        sae_card = published_card(args.sae, _sae_location(args))
    total = sum(f.size for f in files)
    target = f"https://huggingface.co/datasets/{args.repo_id}" + (f" (revision {args.revision})" if args.revision else "")
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(files)} files, {_size(total)}, to {target} "
          f"as {'a private' if args.private else 'a public'} dataset, {_plan(len(files))}:")
    for f in files:
        print(f"  {f.size:>14,}  {f.path}")
    if sae_files is not None:
        print(f"{'would upload' if args.dry_run else 'uploading'} the SAEs of {args.sae} beside it, under "
              f"{SAE_PREFIX}/, one commit:")
        for f in sae_files:
            print(f"  {(Path(args.sae) / f).stat().st_size:>14,}  {SAE_PREFIX}/{f.as_posix()}")
    if args.dry_run:
        print("\n--- README.md (dataset card) ---")
        print(fileio.read_text(fileio.join(args.out, "README.md")))
        if sae_files is not None:
            print(f"--- {SAE_PREFIX}/README.md (SAE card) ---")
            print(sae_card)
        return 0
    try:
        url = _upload(args, files)
        sae_url = _upload_sae(args, sae_files, sae_card) if sae_files is not None else None
    except Exception as exc:  # network, auth, offline mode: report, do not trace back
        print(f"daco publish: upload to {args.repo_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"published: {url}" + (f"\nSAEs: {sae_url}" if sae_url else ""))
    return 0
