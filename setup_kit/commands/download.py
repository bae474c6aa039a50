"""`internlm-kit download`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def command(
    repo: str = typer.Argument("internlm/internlm2-chat-1_8b", metavar="REPO", help="Hub repo id (OWNER/NAME)."),
    local_dir: Optional[Path] = typer.Option(None, "--local-dir", metavar="DIR", help="Folder to put the model in "
                                             "(default: ~/models/<name>, or $INTERNLM_KIT_MODELS/<name>)."),
    source: str = typer.Option("auto", "--source", metavar="SOURCE", help="auto | hf | modelscope | local. auto: a local copy if "
                               "there is one, else the hub, else ModelScope when the hub is unreachable."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", metavar="URL", help="Hub endpoint or mirror, e.g. "
                                           "https://hf-mirror.com (default: $HF_ENDPOINT or huggingface.co)."),
    revision: Optional[str] = typer.Option(None, "--revision", metavar="REV", help="Branch, tag or commit (default: main)."),
    from_dir: Optional[Path] = typer.Option(None, "--from", metavar="DIR", help="Copy (or hard-link) from this folder."),
    include: Optional[List[str]] = typer.Option(None, "--include", metavar="GLOB", help="Only files matching this glob "
                                                "(repeatable), e.g. --include '*.json'."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", metavar="GLOB", help="Leave out files matching "
                                                "this glob (repeatable; applied after --include), e.g. --exclude '*.bin'."),
    token: Optional[str] = typer.Option(None, "--token", metavar="TOKEN", show_default=False, help="Hub access token "
                                        "for gated or private repos (default: $HF_TOKEN or the `hf auth login` one); "
                                        "with --source modelscope, a ModelScope token."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files, sizes and what would be fetched; "
                                 "change nothing."),
    recheck: bool = typer.Option(False, "--recheck", help="Hash every file again, even those verified by an "
                                 "earlier run (they are otherwise trusted while size, mtime and inode are unchanged)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (repo, revision, path, files, "
                                 "bytes, verified) instead of the path."),
) -> None:
    """Fetch the model from the hub, a mirror, ModelScope or a local copy; resume; verify every file."""
    import json
    import sys

    from rich.console import Console

    from setup_kit.download import DownloadRequest, download

    err = Console(stderr=True, soft_wrap=True)
    result = download(DownloadRequest(repo=repo, local_dir=local_dir, source=source, endpoint=endpoint,
                                      revision=revision, from_dir=from_dir, include=include or None,
                                      exclude=exclude or None, token=token, dry_run=dry_run,
                                      progress=not as_json, recheck=recheck), console=err)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    if dry_run:
        out = Console()
        for f in result.files:
            out.print(f"  {f['action']:>8}  {f['size']:>14,}  {f['path']}", highlight=False, markup=False)
        out.print(f"  total {result.bytes:,} bytes; destination {result.path}", highlight=False)
        return
    state = "verified" if result.verified else "NOT verified"
    files = f"{len(result.files)} file{'' if len(result.files) == 1 else 's'}"
    err.print(f"[green]done[/]: {files}, {result.bytes:,} bytes, {state} "
              f"({result.verification}); {result.transferred:,} bytes transferred this run.", highlight=False)
    sys.stdout.write(result.path + "\n")
