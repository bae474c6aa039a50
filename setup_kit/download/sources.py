"""Choosing where the model comes from, and running that source to a verified folder."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from setup_kit import DEFAULT_REPO
from setup_kit.download import hub, local, modelscope
from setup_kit.download.integrity import VerifiedRecord, hash_file
from setup_kit.download.manifest import (
    FileState,
    Manifest,
    Plan,
    RemoteFile,
    Selection,
    check_free_space,
    human_bytes,
    nothing_selected,
    plural,
    refuse_unsafe_listing,
)
from setup_kit.download.progress import DownloadProgress
from setup_kit.errors import KitError, UsageError
from setup_kit.modelfolder import KIT_MANIFEST

SOURCES = ("auto", "hf", "modelscope", "local")
WORKERS = 8  # as many files in flight as `hf download` has


@dataclass
class DownloadRequest:
    repo: str = DEFAULT_REPO
    local_dir: Path | None = None
    source: str = "auto"
    endpoint: str | None = None
    revision: str | None = None
    from_dir: Path | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None  # applied after include, as `hf download` does
    token: str | None = field(default=None, repr=False)  # None: huggingface_hub reads HF_TOKEN / its login
    dry_run: bool = False
    progress: bool = True
    recheck: bool = False  # hash every file again, ignoring the record of files verified earlier

    @property
    def selection(self) -> Selection:
        return Selection.of(self.include, self.exclude)


@dataclass
class DownloadResult:
    repo: str
    revision: str
    path: str
    source: str
    files: list[dict] = field(default_factory=list)
    bytes: int = 0
    transferred: int = 0
    verified: bool = False
    verification: str = ""
    commit: str | None = None
    dry_run: bool = False

    def to_json(self) -> dict:
        return asdict(self)


class Cancelled(Exception):
    """Raised inside a transfer when the user pressed Ctrl-C: the partial file is kept."""


def validate(req: DownloadRequest) -> DownloadRequest:
    if req.repo.count("/") != 1 or not all(req.repo.split("/")):
        raise UsageError(f"{req.repo!r} is not a repo id.", "give it as OWNER/NAME, e.g. internlm/internlm2-chat-1_8b.")
    if req.source not in SOURCES:
        raise UsageError(f"--source {req.source!r} is not one of {', '.join(SOURCES)}.",
                         "use --source auto (the default), hf, modelscope or local.")
    if req.source in ("auto", "hf"):
        hub.check_endpoints(req.endpoint)
    if req.from_dir is not None:
        if req.source in ("hf", "modelscope"):
            raise UsageError(f"--from only makes sense with --source local or auto, not {req.source}.",
                             "drop --from, or use --source local.")
        if not Path(req.from_dir).is_dir():
            raise UsageError(f"--from {req.from_dir}: no such folder.", "give the folder that holds config.json.")
    if req.local_dir is None:
        from setup_kit.locations import default_model_dir

        req.local_dir = default_model_dir(req.repo)
    req.local_dir = Path(req.local_dir).expanduser().absolute()
    if req.local_dir.exists() and not req.local_dir.is_dir():
        raise UsageError(f"--local-dir {req.local_dir} is a file.", "choose a folder path.")
    return req


def download(req: DownloadRequest, console: Console | None = None) -> DownloadResult:
    """Run the request; raise KitError on anything that stops it. ``console`` gets progress and steps."""
    req = validate(req)
    console = console or Console(stderr=True)
    if "." in req.local_dir.name:
        console.print(f"[yellow]note:[/] the folder name {req.local_dir.name!r} contains '.', which breaks "
                      "the remote code's import (`--engine remote-code`); the native engine does not mind.")
    if req.source == "hf":
        return from_hub(req, console)
    if req.source == "modelscope":
        return from_modelscope(req, console)
    if req.source == "local":
        src = req.from_dir or local.find_shared_copy(req.repo, modelscope.modelscope_name(req.repo))
        if src is None:
            raise KitError(f"no local copy of {req.repo} found (looked in "
                           f"{', '.join(str(p) for p in local.candidate_folders(req.repo, modelscope.modelscope_name(req.repo))[:4])}).",
                           "give the folder with --from DIR, or use --source hf.")
        return from_local(req, Path(src), console)
    return auto(req, console)


# ---------------------------------------------------------------- auto


def auto(req: DownloadRequest, console: Console) -> DownloadResult:
    src = req.from_dir or local.find_shared_copy(req.repo, modelscope.modelscope_name(req.repo))
    if not _hub_client_installed():
        return _auto_without_hub_client(req, src, console)
    endpoint = hub.resolve_endpoint(req.endpoint)
    if not req.recheck and _verified_here(req):
        console.print(f"{req.local_dir} already holds a verified download; asking {endpoint} whether it changed")
        src = None
    elif src is not None and req.dry_run:
        # what the real run would place is the local copy's files: listing them needs no hub
        then = "" if hub.offline_mode() else f", then checks every file against {endpoint}"
        console.print(f"dry run: a real run places the local copy at {src} in {req.local_dir}{then}")
        return from_local(req, Path(src), console)
    elif src is None:
        console.print(f"no local copy of {req.repo} on this machine; using the hub ({endpoint})")
    if src is not None:
        console.print(f"[bold]1/2[/] local copy found at {src}: placing it in {req.local_dir}")
        copied = from_local(req, Path(src), console)
        if hub.offline_mode():
            console.print("HF_HUB_OFFLINE is set: the copy was checked on its own (sizes, safetensors headers, index).")
            return copied
        console.print(f"[bold]2/2[/] checking every file against {endpoint}")
        try:
            return from_hub(req, console)
        except hub.HubUnreachable as exc:
            console.print(f"the hub is not reachable ({escape(exc.message)}); keeping the local copy, checked on its own.")
            return copied
    try:
        return from_hub(req, console)
    except hub.HubUnreachable as exc:
        console.print(f"[yellow]hub unreachable:[/] {escape(exc.message)}")
        if hub.offline_mode():
            raise
        console.print(f"trying ModelScope ({modelscope.modelscope_name(req.repo)}) instead")
        if not modelscope.modelscope_available():
            raise modelscope.not_installed_error("the hub is unreachable and ") from None
        return _fall_back_to_modelscope(req, console)


def _hub_client_installed() -> bool:
    return importlib.util.find_spec("huggingface_hub") is not None


def _auto_without_hub_client(req: DownloadRequest, src: Path | None, console: Console) -> DownloadResult:
    """The core install has no huggingface_hub (the chat extra brings it): the hub cannot be asked, so a
    local copy is checked on its own, and without one ModelScope is the source."""
    if src is not None:
        console.print(f"huggingface_hub is not installed: placing the local copy at {src}, checked on its own")
        return from_local(req, Path(src), console)
    if not modelscope.modelscope_available():
        raise KitError("neither huggingface_hub nor modelscope is installed, so nothing can download the model.",
                       "pip install huggingface_hub (or internlm-kit[chat]) for the hub, or pip install modelscope; "
                       "or --from DIR if the files are already on this machine.")
    console.print(f"huggingface_hub is not installed, so the hub cannot be used; "
                  f"trying ModelScope ({modelscope.modelscope_name(req.repo)}) instead")
    return _fall_back_to_modelscope(req, console)


def _fall_back_to_modelscope(req: DownloadRequest, console: Console) -> DownloadResult:
    """A --token meant for the hub is never handed to another service: ModelScope has its own tokens."""
    if req.token:
        console.print("note: --token is a hub token, so it is not sent to ModelScope "
                      "(give a ModelScope token with --source modelscope --token).")
        req = replace(req, token=None)
    return from_modelscope(req, console)


def _verified_here(req: DownloadRequest) -> bool:
    saved = _load_manifest(req.local_dir, req.repo)
    if saved is None:
        return False
    record = VerifiedRecord(req.local_dir)
    return all(record.is_verified(req.local_dir / f.path, f) for f in saved.select(req.selection).files)


# ---------------------------------------------------------------- hub


def from_hub(req: DownloadRequest, console: Console) -> DownloadResult:
    if not _hub_client_installed():
        raise KitError("the `huggingface_hub` package is not installed, so the hub cannot be used.",
                       "pip install huggingface_hub (or internlm-kit[chat]), or use --source modelscope, "
                       "or --from DIR if the files are already on this machine.")
    endpoint = hub.resolve_endpoint(req.endpoint)
    revision = req.revision or "main"
    if hub.offline_mode():
        return _offline_check(req, revision, console)
    listing = hub.fetch_manifest(req.repo, revision, endpoint, req.token)
    listing.refuse_unsafe_paths(req.local_dir, f"{endpoint} ({req.repo} at {revision})")  # before any write
    manifest = listing.select(req.selection)
    record = VerifiedRecord(req.local_dir, trust=not req.recheck)
    plan = inspect_folder(manifest, req.local_dir, record)
    _say_plan(plan, console)
    if req.dry_run:
        return _result(req, manifest, "hf", plan, verified=False, verification="dry run: nothing fetched",
                       dry_run=True)
    check_free_space(plan)
    req.local_dir.mkdir(parents=True, exist_ok=True)
    _save_manifest(req.local_dir, listing)  # the whole repo: a later full run must not think a selection is all
    transferred = run_plan(plan, endpoint, record, console, req.progress, token=req.token)
    if not req.selection:
        hub.drop_stale_partials(req.local_dir, manifest)
    return _result(req, manifest, "hf", plan, verified=True, transferred=transferred,
                   verification=f"size and {'/'.join(sorted({f.digest_kind for f in manifest.files}))} "
                                f"of every file against {endpoint}")


def inspect_folder(manifest: Manifest, local_dir: Path, record: VerifiedRecord) -> Plan:
    plan = Plan(manifest, local_dir)
    for rf in manifest.files:
        final = local_dir / rf.path
        part = hub.partial_path(local_dir, rf)
        if record.is_verified(final, rf):
            plan.states.append(FileState(rf, "verified", rf.size))
        elif final.is_file() and final.stat().st_size == rf.size:
            plan.states.append(FileState(rf, "check", rf.size))
        elif part.is_file() and 0 < part.stat().st_size <= rf.size:
            plan.states.append(FileState(rf, "resume", part.stat().st_size))
        else:
            plan.states.append(FileState(rf, "fetch", 0))
    for group in same_content(plan):
        source = group[0]  # the best placed: verified, else on disk to check, else the one to fetch
        for state in group:
            if state is not source and state.status in ("fetch", "resume"):
                state.status, state.have, state.of = "link", 0, source.file.path
    return plan


def same_content(plan: Plan) -> list[list[FileState]]:
    """The plan's files grouped by the partial file they would be fetched into (one per content): a
    repo can hold identical files (a copied tokenizer, empty files), and two writers on one partial
    would lock each other out. Each group is settled by one worker: one fetch, hard links for the rest."""
    groups: dict[Path, list[FileState]] = {}
    for state in plan.states:
        groups.setdefault(hub.partial_path(plan.local_dir, state.file), []).append(state)
    order = {"verified": 0, "check": 1, "link": 3}  # what is proven first, so the rest can link to it
    return [sorted(g, key=lambda s: order.get(s.status, 2)) for g in groups.values()]


def run_plan(plan: Plan, endpoint: str, record: VerifiedRecord, console: Console, show: bool,
             token: str | None = None) -> int:
    """Check what is there, fetch what is not; returns the bytes transferred."""
    cancel = threading.Event()
    transferred = 0
    lock = threading.Lock()
    to_check = sum(s.file.size for s in plan.states if s.status == "check")
    interrupted = False
    with DownloadProgress(console, plan.bytes_to_fetch, enabled=show, to_check=to_check) as progress, \
            hub.network_sized_chunks():

        def fetch(state: FileState) -> None:
            nonlocal transferred
            rf = state.file
            if state.status in ("check", "link"):  # planned as no transfer: it has to travel after all
                progress.add_total(rf.size)
            bar = progress.file(rf.path, rf.size, done=state.have if state.status == "resume" else 0)

            def on_bytes(n: int) -> None:
                if cancel.is_set():
                    raise Cancelled()
                bar(n)

            try:
                fetched = hub.fetch_file(plan.manifest, rf, plan.local_dir, endpoint, record, on_bytes, token=token)
            finally:
                bar.finish()
            with lock:
                transferred += fetched.transferred

        def settle(group: list[FileState]) -> None:
            good = None  # a file of this content already in place and proven
            for state in group:
                rf = state.file
                final = plan.local_dir / rf.path
                if state.status == "verified":
                    good = good or final
                    continue
                if state.status == "check":
                    digest = hash_file(final, rf, on_bytes=progress.checked).hexdigest()
                    if not rf.expected_digest or digest == rf.expected_digest:
                        record.mark(final, rf)
                        good = good or final
                        continue
                    console.print(f"[yellow]{escape(rf.path)}[/] does not match the hub's {rf.digest_kind}: "
                                  "fetching it again", highlight=False)
                    record.forget(rf)
                if good is not None:
                    local.place_file(good, final)
                    record.mark(final, rf)
                    hub.tell_huggingface_hub(plan.local_dir, rf, plan.manifest)
                    continue
                fetch(state)
                good = final
            if len(group) > 1:  # a partial of this content left from an earlier run is done with
                hub.partial_path(plan.local_dir, group[0].file).unlink(missing_ok=True)

        pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="internlm-kit-download")
        futures = [pool.submit(settle, g) for g in same_content(plan)]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except KeyboardInterrupt:
            interrupted = True
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            if any(f.done() and f.exception() is not None for f in done):
                cancel.set()  # one file failed: stop the others at their next write (partials are kept)
            pool.shutdown(wait=True, cancel_futures=True)
    if interrupted:  # said below the last progress bar, where the eye is
        console.print("interrupted: what arrived is kept in partial files; "
                      "run the same command again to resume.")
        raise KeyboardInterrupt
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    for exc in errors:
        if not isinstance(exc, Cancelled):
            raise exc
    return transferred


def _offline_check(req: DownloadRequest, revision: str, console: Console) -> DownloadResult:
    saved = _load_manifest(req.local_dir, req.repo)
    if saved is None:
        raise hub.HubUnreachable(f"HF_HUB_OFFLINE is set and {req.local_dir} holds no earlier download of {req.repo}.",
                                 "unset HF_HUB_OFFLINE, or use --source local --from DIR.")
    manifest = saved.select(req.selection)
    record = VerifiedRecord(req.local_dir)
    plan = inspect_folder(manifest, req.local_dir, record)
    bad = []
    for state in plan.states:
        rf = state.file
        if state.status == "check" and hash_file(req.local_dir / rf.path, rf).hexdigest() == rf.expected_digest:
            record.mark(req.local_dir / rf.path, rf)
        elif state.status != "verified":
            bad.append(rf.path)
    if bad:
        raise hub.HubUnreachable(f"HF_HUB_OFFLINE is set and {plural(len(bad), 'file')} in {req.local_dir} "
                                 f"{'is' if len(bad) == 1 else 'are'} missing or damaged: {', '.join(bad[:5])}.", "unset HF_HUB_OFFLINE and run it again to fetch them.")
    console.print("HF_HUB_OFFLINE is set: checked against the metadata saved by the earlier download.")
    return _result(req, manifest, "hf", plan, verified=True,
                   verification="offline, against the hub metadata saved at download time")


def _save_manifest(local_dir: Path, manifest: Manifest) -> None:
    path = Path(local_dir) / KIT_MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"repo": manifest.repo, "revision": manifest.revision, "commit": manifest.commit,
            "files": [asdict(f) for f in manifest.files]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _load_manifest(local_dir: Path, repo: str) -> Manifest | None:
    try:
        data = json.loads((Path(local_dir) / KIT_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if data.get("repo") != repo:
        return None
    manifest = Manifest(repo, data["revision"], data.get("commit"), [RemoteFile(**f) for f in data["files"]])
    record = Path(local_dir) / KIT_MANIFEST
    manifest.refuse_unsafe_paths(local_dir, f"the download record {record}", "download record (edited or planted)",
                                 fix=f"delete {record} (the next download writes it again) and run this again.")
    return manifest


# ---------------------------------------------------------------- local and ModelScope


def from_local(req: DownloadRequest, src: Path, console: Console) -> DownloadResult:
    every = local.list_local_files(src)
    refuse_unsafe_listing([f.path for f in every], req.local_dir, f"the copy at {src}", "copy",  # before any write
                          fix="use another copy (--from DIR), or download the model: --source hf (or modelscope).")
    files = [f for f in every if req.selection.keeps(f.path)]
    if not files:
        if req.selection and every:
            raise nothing_selected(req.selection, f"the {plural(len(every), 'file')} in {src}", [f.path for f in every])
        raise KitError(f"{src} holds no files.", "point --from at the model folder (the one with config.json).")
    problems = local.structure_problems(src) if not req.selection else []
    if problems:
        raise KitError(f"the copy at {src} is incomplete or damaged: {'; '.join(problems[:4])}.",
                       "use another copy (--from DIR), or download it: --source hf (or modelscope).")
    manifest = Manifest(req.repo, req.revision or "local", None, files)
    plan = _local_plan(manifest, src, req.local_dir)
    if req.dry_run:
        _say_local_plan(plan, src, console)
        return _result(req, manifest, "local", plan, verified=False, dry_run=True,
                       verification=f"dry run: nothing placed from {src}")
    check_free_space(plan)  # copies need room, hard links none
    todo = [s.file for s in plan.states if s.status != "present"]
    hows = {rf.path: local.place_file(src / rf.path, req.local_dir / rf.path) for rf in todo}
    if hows:
        kinds = sorted(set(hows.values()))
        console.print(f"{plural(len(hows), 'file')} {' and '.join(kinds)} from {escape(str(src))}", highlight=False)
    problems = _placed_problems(req.local_dir, files, req.selection)
    mismatched = [f.path for f in files if (req.local_dir / f.path).stat().st_size != f.size]
    if problems or mismatched:
        raise KitError(f"the copy in {req.local_dir} does not check out: {'; '.join((problems + mismatched)[:4])}.",
                       "run it again; if it persists, download from the hub with --source hf.")
    return _result(req, manifest, "local", plan, verified=True,
                   verification=f"copied from {src}: sizes, safetensors headers and the shard index checked "
                                "(no hub metadata used)")


def _local_plan(manifest: Manifest, src: Path, local_dir: Path) -> Plan:
    """What placing ``src`` does to each file: nothing (it is there already), a hard link (same
    filesystem) or a copy."""
    if src.resolve() == local_dir.resolve():
        return Plan(manifest, local_dir, [FileState(rf, "present", rf.size) for rf in manifest.files])
    how = "link" if _same_device(src, local_dir) else "copy"
    return Plan(manifest, local_dir, [
        FileState(rf, "present", rf.size) if _already_placed(src / rf.path, local_dir / rf.path) else FileState(rf, how)
        for rf in manifest.files])


def _placed_problems(local_dir: Path, files: list[RemoteFile], selection: Selection) -> list[str]:
    """What the files themselves prove wrong: the whole folder's structure, or for a selection (whose
    index may name shards left out on purpose) each selected safetensors file's header."""
    if selection:
        return [f"{rf.path}: {problem}" for rf in files if rf.path.endswith(".safetensors")
                and (problem := local.safetensors_problem(local_dir / rf.path))]
    return local.structure_problems(local_dir)


def _already_placed(src: Path, dest: Path) -> bool:
    """The same file, or one of the same size the user already has (never overwritten: the hub check
    that follows in `auto`, or the structure check, judges it)."""
    try:
        a, b = dest.stat(), Path(os.path.realpath(src)).stat()
    except OSError:
        return False
    return os.path.samestat(a, b) or a.st_size == b.st_size


def _same_device(src: Path, local_dir: Path) -> bool:
    probe = local_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return Path(os.path.realpath(src)).stat().st_dev == probe.stat().st_dev


def from_modelscope(req: DownloadRequest, console: Console) -> DownloadResult:
    if req.dry_run:
        raise KitError("--dry-run needs the hub's file list, which ModelScope's client does not give.",
                       "run --dry-run with --source hf (or a mirror endpoint).")
    model_id, listed = modelscope.list_modelscope_files(req.repo, req.revision, token=req.token)
    refuse_unsafe_listing(listed, req.local_dir, f"ModelScope's {model_id}", "repo")  # before any write
    wanted = [p for p in listed if req.selection.keeps(p)]
    if not wanted:
        if req.selection and listed:
            raise nothing_selected(req.selection, f"the {plural(len(listed), 'file')} in ModelScope's {model_id}",
                                   listed)
        raise KitError(f"ModelScope lists no files for {model_id}.", "check the repo name and --revision.")
    req.local_dir.mkdir(parents=True, exist_ok=True)
    received = modelscope.fetch_from_modelscope(model_id, req.revision, req.local_dir, wanted, token=req.token)
    placed = set(wanted)
    files = [f for f in local.list_local_files(req.local_dir) if f.path in placed]
    problems = _placed_problems(req.local_dir, files, req.selection)
    if problems:
        raise KitError(f"ModelScope's copy of {model_id} in {req.local_dir} does not check out: {'; '.join(problems[:4])}.",
                       "run it again to let ModelScope repair it, or use --source hf.")
    manifest = Manifest(req.repo, req.revision or "master", None, files)
    plan = Plan(manifest, req.local_dir, [FileState(f, "verified") for f in files])
    return _result(req, manifest, "modelscope", plan, verified=True, transferred=received or 0,
                   verification=f"ModelScope ({model_id}) checked its hashes; sizes, safetensors headers and index checked here")


# ---------------------------------------------------------------- reporting


def _say_plan(plan: Plan, console: Console) -> None:
    m = plan.manifest
    states = {s.status: 0 for s in plan.states}
    for s in plan.states:
        states[s.status] += 1
    resumed = sum(s.have for s in plan.states if s.status == "resume")
    line = (f"{m.repo}@{(m.commit or m.revision)[:12]}: {plural(len(m.files), 'file')}, {human_bytes(m.total_bytes)}; "
            f"{human_bytes(plan.bytes_to_fetch)} to fetch")
    if resumed:
        line += f" (resuming {plural(states['resume'], 'file')}, {human_bytes(resumed)} already here)"
    if states.get("link"):
        line += f"; {plural(states['link'], 'file')} the same as another in the repo (fetched once, hard-linked)"
    if states.get("check"):
        line += f"; {plural(states['check'], 'file')} on disk to check"
    if states.get("verified"):
        line += f"; {states['verified']} already verified"
    console.print(line, markup=False, highlight=False)


def _say_local_plan(plan: Plan, src: Path, console: Console) -> None:
    n = {how: sum(s.status == how for s in plan.states) for how in ("link", "copy", "present")}
    parts = [(n["link"], f"{n['link']} to hard-link"),
             (n["copy"], f"{n['copy']} to copy ({human_bytes(plan.bytes_to_fetch)})"),
             (n["present"], f"{n['present']} already there")]
    console.print(f"{src}: {plural(len(plan.states), 'file')}, {human_bytes(plan.manifest.total_bytes)}; "
                  f"{', '.join(text for count, text in parts if count)}; destination {plan.local_dir}",
                  markup=False, highlight=False)


def _result(req, manifest: Manifest, source: str, plan: Plan, *, verified: bool, verification: str,
            transferred: int = 0, dry_run: bool = False) -> DownloadResult:
    files = [{"path": s.file.path, "size": s.file.size,
              "sha256": s.file.sha256, "action": s.status if dry_run else "ok"} for s in plan.states]
    return DownloadResult(repo=req.repo, revision=manifest.revision, commit=manifest.commit,
                          path=str(req.local_dir), source=source, files=files, bytes=manifest.total_bytes,
                          transferred=transferred, verified=verified, verification=verification, dry_run=dry_run)
