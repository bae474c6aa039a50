"""Reading a model folder without loading its weights: config, tokenizer, shards, remote code.

`inspect_model_folder` collects facts and the problems it sees; `open_model_folder` is the strict
form that engines call (it raises `ModelFolderError` with the first blocking problem).
Only the stdlib is used so the doctor can read a folder from a broken environment.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from dataclasses import dataclass, field
from pathlib import Path

from setup_kit.errors import ModelFolderError
from setup_kit.repo_paths import unsafe_reason

SUPPORTED_MODEL_TYPES = ("internlm2", "llama")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
# Bytes per element of the safetensors dtypes (for parameter counts).
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
               "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
# Where `internlm-kit download` keeps its bookkeeping inside a model folder (beside huggingface_hub's
# own .cache/huggingface), and its record of the repo's files, whose "repo" is the one repo id known
# for sure. Defined here, in a stdlib-only module, so reading it needs no download machinery.
KIT_STATE_DIR = Path(".cache") / "internlm-kit"
KIT_MANIFEST = KIT_STATE_DIR / "manifest.json"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the folder. ``blocking`` problems stop every engine from loading it."""

    code: str  # stable: config-missing, shard-truncated, tokenizer-missing, ...
    message: str
    fix: str
    blocking: bool = True


@dataclass
class WeightFile:
    name: str
    size: int  # bytes on disk (-1 when the file is missing)
    expected_size: int | None = None  # what the safetensors header says the file must be
    tensors: int = 0
    parameters: int = 0
    data_bytes: int = 0
    problem: str = ""  # empty when the file looks whole
    tensor_names: frozenset = field(default=frozenset(), repr=False)


@dataclass
class ModelFolder:
    path: Path
    config: dict = field(default_factory=dict)
    model_type: str | None = None
    weight_files: list[WeightFile] = field(default_factory=list)
    index: dict | None = None  # model.safetensors.index.json, parsed
    tokenizer_files: list[str] = field(default_factory=list)
    remote_code_files: list[str] = field(default_factory=list)  # *.py in the folder
    remote_code_needed: list[str] = field(default_factory=list)  # files auto_map names
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.blocking for p in self.problems)

    @property
    def auto_map(self) -> dict:
        value = self.config.get("auto_map")
        return value if isinstance(value, dict) else {}

    @property
    def uses_remote_code(self) -> bool:
        return bool(self.auto_map)

    @property
    def torch_dtype(self) -> str:
        return str(self.config.get("torch_dtype") or self.config.get("dtype") or "")

    @property
    def parameters(self) -> int:
        """Parameter count from the shard headers (0 when there are none)."""
        return sum(w.parameters for w in self.weight_files)

    @property
    def weight_bytes(self) -> int:
        return sum(w.data_bytes for w in self.weight_files)

    def problem(self, code: str) -> Problem | None:
        return next((p for p in self.problems if p.code == code), None)


def inspect_model_folder(path: str | Path) -> ModelFolder:
    """Everything the kit needs to know about a model folder, reading headers only."""
    folder = ModelFolder(path=Path(path).expanduser())
    if not folder.path.is_dir():
        folder.problems.append(Problem(
            "folder-missing", f"{folder.path} is not a folder.",
            f"Check the path, or download the model there: {download_command(folder)}"))
        return folder
    if not _looks_like_a_model(folder.path):
        folder.problems.append(Problem(
            "not-a-model-folder",
            f"{folder.path} is not a model folder: it has no config.json and no weights (*.safetensors).",
            "Point --model at the folder that holds config.json and the weights (the path "
            f"`internlm-kit download` printed last), or download the model into this one: {download_command(folder)}"))
        return folder
    _read_config(folder)
    _read_tokenizer(folder)
    _read_weights(folder)
    _read_remote_code(folder)
    return folder


def open_model_folder(path: str | Path) -> ModelFolder:
    """The folder, or `ModelFolderError` naming the first blocking problem."""
    folder = inspect_model_folder(path)
    blocking = [p for p in folder.problems if p.blocking]
    if blocking:
        first = blocking[0]
        more = f" ({len(blocking) - 1} more problem(s))" if len(blocking) > 1 else ""
        raise ModelFolderError(
            f"The model folder {folder.path} cannot be used: {first.message}{more}",
            f"{first.fix}  (all problems: internlm-kit doctor --model {folder.path})")
    return folder


# --- the parts -------------------------------------------------------------------------------

def _looks_like_a_model(path: Path) -> bool:
    """Anything a model folder is made of: without config.json and weights, every per-file problem
    (config, tokenizer, weights) would only repeat that the folder given is the wrong one."""
    return ((path / "config.json").exists() or any(path.glob("*.safetensors"))
            or (path / "model.safetensors.index.json").exists() or any(path.glob("pytorch_model*.bin")))


def source_repo(folder: ModelFolder) -> tuple[str, str | None]:
    """The hub repo the folder holds, and where that guess comes from (None when it is certain).

    A download command without the repo would fetch the default model into this folder, over a
    different one. Only the kit's own download record is certain: a fine-tune keeps its base model's
    ``_name_or_path``, and a folder can be named anything."""
    try:
        recorded = json.loads((folder.path / KIT_MANIFEST).read_text(encoding="utf-8")).get("repo")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and REPO_ID.match(recorded):
        return recorded, None
    named = folder.config.get("_name_or_path")
    if isinstance(named, str) and REPO_ID.match(named):
        return named, "config.json's _name_or_path"
    from setup_kit.checks.fixes import DEFAULT_REPO, repo_from_shape

    config = folder.config
    if not config:  # the listing problems are found before config.json is parsed
        try:
            config = json.loads((folder.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    if isinstance(config, dict) and (found := repo_from_shape(config, folder.path)):
        return found
    name = folder.path.absolute().name
    if name.startswith("internlm") and folder.model_type in (None, "internlm2") and REPO_ID.match(f"internlm/{name}"):
        return f"internlm/{name}", "the folder name"
    return DEFAULT_REPO, "nothing in the folder names its model: assumed to be the kit's default model"


def download_command(folder: ModelFolder) -> str:
    """`internlm-kit download REPO --local-dir DIR` for this folder, saying how sure the REPO is."""
    repo, guessed_from = source_repo(folder)
    command = f"internlm-kit download {repo} --local-dir {shlex.quote(str(folder.path))}"
    if guessed_from:
        taken = guessed_from if guessed_from.startswith(("inferred", "nothing")) else f"taken from {guessed_from}"
        return f"{command}   ({repo}: {taken}; name the right repo if it holds another)"
    return command


def _redownload(folder: ModelFolder, what: str) -> str:
    return f"Download {what} again (it verifies sizes and hashes): {download_command(folder)}"


def _read_config(folder: ModelFolder) -> None:
    config_path = folder.path / "config.json"
    if not config_path.is_file():
        folder.problems.append(Problem(
            "config-missing", "config.json is missing, so this is not a transformers model folder.",
            _redownload(folder, "the model")))
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        folder.problems.append(Problem(
            "config-unreadable", f"config.json cannot be read: {exc}.",
            _redownload(folder, "config.json")))
        return
    folder.config = config
    folder.model_type = config.get("model_type")
    if folder.model_type not in SUPPORTED_MODEL_TYPES:
        folder.problems.append(Problem(
            "model-type-unsupported",
            f"config.json says model_type={folder.model_type!r}; the kit runs "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} models.",
            "Point --model at an InternLM2 folder (internlm-kit download) or one made by "
            "internlm-kit convert."))


def _is_lfs_pointer(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def _read_tokenizer(folder: ModelFolder) -> None:
    folder.tokenizer_files = [n for n in TOKENIZER_FILES if (folder.path / n).is_file()]
    if "tokenizer.model" not in folder.tokenizer_files and "tokenizer.json" not in folder.tokenizer_files:
        folder.problems.append(Problem(
            "tokenizer-missing",
            "neither tokenizer.model nor tokenizer.json is in the folder, so no tokenizer can be built.",
            _redownload(folder, "the tokenizer files")))
        return
    if "tokenizer.model" in folder.tokenizer_files and _is_lfs_pointer(folder.path / "tokenizer.model"):
        folder.problems.append(Problem(
            "tokenizer-lfs-pointer",
            "tokenizer.model is a git-lfs pointer, not the sentencepiece model (the repo was cloned "
            "without git-lfs); loading it fails with 'sentencepiece_processor.cc ... ParseFromArray'.",
            "Run `git lfs install && git lfs pull` in the clone; or: " + _redownload(folder, "the model")))
    if "tokenizer_config.json" not in folder.tokenizer_files:
        folder.problems.append(Problem(
            "tokenizer-config-missing",
            "tokenizer_config.json is missing: the chat template and the chat tokens' names "
            "(<|im_start|>, <|im_end|>) come from it.",
            _redownload(folder, "tokenizer_config.json"), blocking=False))


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The header's JSON and the file size it implies (8 + header length + end of the last tensor)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} is not plausible")
        raw = handle.read(length)
    if len(raw) < length:
        raise ValueError(f"the header is cut off ({len(raw)} of {length} bytes)")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return header, 8 + length + end


def _inspect_safetensors(path: Path) -> WeightFile:
    weight = WeightFile(name=path.name, size=path.stat().st_size)
    if _is_lfs_pointer(path):
        weight.problem = "a git-lfs pointer, not the weights (cloned without git-lfs)"
        return weight
    try:
        header, expected = read_safetensors_header(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        weight.problem = f"its safetensors header cannot be read ({exc})"
        return weight
    weight.expected_size = expected
    weight.tensor_names = frozenset(k for k in header if k != "__metadata__")
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        begin, end = tensor["data_offsets"]
        weight.tensors += 1
        weight.data_bytes += end - begin
        numel = 1
        for dim in tensor.get("shape", []):
            numel *= dim
        weight.parameters += numel
    if weight.size < expected:
        weight.problem = (f"truncated: {weight.size:,} bytes on disk, its header says "
                          f"{expected:,}")
    elif weight.size > expected:
        weight.problem = f"{weight.size - expected:,} bytes longer than its header says"
    return weight


def _read_weights(folder: ModelFolder) -> None:
    index_path = folder.path / "model.safetensors.index.json"
    names: list[str]
    if index_path.is_file():
        try:
            folder.index = json.loads(index_path.read_text(encoding="utf-8"))
            names = sorted(set(folder.index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            folder.problems.append(Problem(
                "index-unreadable", f"model.safetensors.index.json cannot be read: {exc}.",
                _redownload(folder, "model.safetensors.index.json")))
            names = sorted(p.name for p in folder.path.glob("*.safetensors"))
    else:
        names = sorted(p.name for p in folder.path.glob("*.safetensors"))
    if not names:
        legacy = sorted(p.name for p in folder.path.glob("pytorch_model*.bin"))
        if legacy:
            folder.weight_files = [WeightFile(n, (folder.path / n).stat().st_size) for n in legacy]
            return
        folder.problems.append(Problem(
            "weights-missing", "there are no weight files (*.safetensors) in the folder.",
            _redownload(folder, "the weights")))
        return
    for name in names:
        # The index is the repo's word, not the kit's. Links are not followed here: a huggingface cache
        # snapshot links every file to a blob outside its folder, and that is the user's own layout.
        if reason := unsafe_reason(name):
            folder.weight_files.append(WeightFile(str(name), -1, problem="outside the folder"))
            folder.problems.append(Problem(
                "index-unsafe-path", f"model.safetensors.index.json names the shard {name!r}, which {reason}; "
                "it was not read. An index like that comes from a broken or hostile repo.",
                "Take the model from a source you trust: " + download_command(folder)))
            continue
        path = folder.path / name
        if not path.is_file():
            folder.weight_files.append(WeightFile(name, -1, problem="missing"))
            folder.problems.append(Problem(
                "shard-missing", f"the weight shard {name} named by the index is missing.",
                _redownload(folder, name)))
            continue
        weight = _inspect_safetensors(path)
        folder.weight_files.append(weight)
        if weight.problem:
            code = "shard-truncated" if weight.problem.startswith("truncated") else "shard-damaged"
            folder.problems.append(Problem(
                code, f"the weight shard {name} is {weight.problem}.", _redownload(folder, name)))
    _check_index_against_headers(folder)


def _check_index_against_headers(folder: ModelFolder) -> None:
    """Every tensor the index places in a shard is in that shard's header (a shard from another
    revision of the model is whole, but not this model's)."""
    if not folder.index:
        return
    headers = {w.name: w.tensor_names for w in folder.weight_files if w.tensor_names}
    absent = sorted(t for t, shard in folder.index.get("weight_map", {}).items()
                    if shard in headers and t not in headers[shard])
    if absent:
        shard = folder.index["weight_map"][absent[0]]
        folder.problems.append(Problem(
            "index-mismatch", f"the index places {len(absent)} tensor(s) in {shard} that it does not hold "
            f"(first: {absent[0]}); the shards and the index come from different revisions.",
            _redownload(folder, "the model")))


_MODULE_FILE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\.[A-Za-z_][A-Za-z0-9_]*$")


def remote_code_modules(auto_map: dict) -> list[str]:
    """The .py files an auto_map points at (``"configuration_internlm2.InternLM2Config"`` ->
    ``configuration_internlm2.py``; a ``repo--module.Class`` reference names another repo's file)."""
    files = set()
    for value in auto_map.values():
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, str) and (match := _MODULE_FILE.match(ref)):
                files.add(match.group(1) + ".py")
    return sorted(files)


def _read_remote_code(folder: ModelFolder) -> None:
    folder.remote_code_files = sorted(p.name for p in folder.path.glob("*.py"))
    if not folder.uses_remote_code:
        return
    folder.remote_code_needed = remote_code_modules(folder.auto_map)
    missing = [n for n in folder.remote_code_needed if n not in folder.remote_code_files]
    if missing:
        folder.problems.append(Problem(
            "remote-code-missing",
            f"config.json's auto_map needs {', '.join(missing)}, which the folder lacks; the "
            "remote-code engine cannot load it (the native engine does not need it).",
            _redownload(folder, "the remote code"), blocking=False))
    if "." in folder.path.resolve().name:
        safe = folder.path.resolve().name.replace(".", "_")
        folder.problems.append(Problem(
            "dot-in-folder-name",
            f"the folder name '{folder.path.resolve().name}' contains '.', which breaks transformers' "
            "dynamic import of the remote code (trust_remote_code).",
            f"mv '{folder.path}' '{folder.path.resolve().parent / safe}'", blocking=False))
