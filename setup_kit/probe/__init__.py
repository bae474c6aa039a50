"""Facts about a target environment, gathered without trusting it.

`probe_environment` runs `env_script.py` with the target interpreter; `probe_torch` imports torch
in its own subprocess; `probe_gpu` asks NVML / nvidia-smi / libcuda. Each has a timeout, and a
target that hangs, crashes or prints garbage becomes a fact to report, never a doctor crash.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from setup_kit.errors import UsageError
from setup_kit.probe.gpu import Gpu, GpuFacts, probe_gpu

__all__ = ["EnvironmentFacts", "Distribution", "TorchFacts", "Gpu", "GpuFacts", "probe_environment",
           "probe_torch", "probe_gpu", "probe_imports", "resolve_python", "in_process_environment"]

HERE = Path(__file__).resolve().parent
ENV_TIMEOUT = 30.0
TORCH_TIMEOUT = 60.0


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    requires: tuple[str, ...] = ()


@dataclass
class EnvironmentFacts:
    python: dict
    platform: dict
    markers: dict
    distributions: dict[str, Distribution]  # by canonical name
    environment: dict[str, str]  # relevant variables, secrets already redacted
    unreadable: list[dict] = field(default_factory=list)  # {"path", "error"[, "name", "version"]}

    @classmethod
    def from_json(cls, data: dict) -> EnvironmentFacts:
        dists = {canonical(d["name"]): Distribution(d["name"], d["version"], tuple(d.get("requires") or ()))
                 for d in data.get("distributions", [])}
        return cls(data["python"], data["platform"], data.get("markers", {}), dists,
                   data.get("environment", {}), list(data.get("unreadable_distributions") or []))

    @property
    def executable(self) -> str:
        return self.python["executable"]

    @property
    def python_version(self) -> str:
        return self.python["version"]

    def version(self, name: str) -> str | None:
        dist = self.distributions.get(canonical(name))
        return dist.version if dist else None

    def has(self, name: str) -> bool:
        return canonical(name) in self.distributions


@dataclass
class TorchFacts:
    status: str  # ok | missing | timeout | crashed | error
    version: str = ""
    cuda: str = ""  # torch.version.cuda; "" for a CPU build
    cuda_available: bool = False
    devices: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    detail: str = ""  # what went wrong, for anything but ok
    seconds: float = 0.0


def resolve_python(python: str | None) -> str:
    """The target interpreter as an absolute path (the running one when None)."""
    if python is None:
        return sys.executable
    found = shutil.which(python) if os.sep not in python else python
    path = Path(found).expanduser() if found else None
    if path is None or not path.exists():
        raise UsageError(f"The Python interpreter '{python}' does not exist.",
                         "Pass the interpreter of the environment to check, e.g. "
                         "--python ~/miniconda3/envs/internlm/bin/python or --python .venv/bin/python.")
    if path.is_dir():
        for candidate in (path / "bin" / "python", path / "Scripts" / "python.exe"):
            if candidate.exists():
                return str(candidate.absolute())
        raise UsageError(f"'{python}' is a folder without bin/python.",
                         "Pass the interpreter itself, e.g. --python ENV/bin/python.")
    if not os.access(path, os.X_OK):
        raise UsageError(f"'{python}' is not executable.", "Pass a Python interpreter, e.g. --python ENV/bin/python.")
    return str(path.absolute())


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def start_script(python: str, script: str, stdin: bool = False) -> subprocess.Popen:
    """Start one of this package's scripts under `python` (PYTHONSAFEPATH keeps cwd off sys.path)."""
    env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONDONTWRITEBYTECODE="1", PYTHONIOENCODING="utf-8")
    return subprocess.Popen([python, str(HERE / script)], env=env, text=True,
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float, stdin: str | None = None) -> tuple[str, str, str]:
    """(status, stdout, stderr): status is ok | timeout | crashed. A hung process group is killed."""
    try:
        out, err = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = process.communicate()
        return "timeout", out or "", err or ""
    if process.returncode != 0:
        return "crashed", out, err
    return "ok", out, err


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def environment_from(process: subprocess.Popen, python: str, timeout: float = ENV_TIMEOUT) -> EnvironmentFacts:
    from setup_kit.errors import KitError

    status, out, err = finish(process, timeout)
    fix = (f"Point --python at the environment's Python 3.8+ interpreter (e.g. ENV/bin/python) and check "
           f"that it starts: {python} -c 'import sys; print(sys.version)'")
    if status == "timeout":
        raise KitError(f"The interpreter {python} did not answer the probe within {timeout:.0f}s.", fix, exit_code=2)
    try:
        if status != "ok":
            raise ValueError(f"{describe_exit(process.returncode)}: {_tail(err, 3)}")
        return EnvironmentFacts.from_json(json.loads(out))
    except (ValueError, KeyError, TypeError) as exc:
        raise KitError(f"Could not read the environment of {python} ({exc}). The doctor needs Python >= 3.8 there.",
                       fix, exit_code=2) from None


def probe_environment(python: str | None = None, timeout: float = ENV_TIMEOUT) -> EnvironmentFacts:
    """Python, platform, installed distributions (with Requires-Dist) and relevant variables."""
    target = resolve_python(python)
    return environment_from(start_script(target, "env_script.py"), target, timeout)


def in_process_environment() -> EnvironmentFacts:
    """The same facts for the running interpreter, without a subprocess (for the preflight)."""
    from setup_kit.probe import env_script

    return EnvironmentFacts.from_json(env_script.collect())


def torch_timeout() -> float:
    """`INTERNLM_KIT_TORCH_TIMEOUT` seconds (default 60): how long `import torch` may take."""
    try:
        return float(os.environ.get("INTERNLM_KIT_TORCH_TIMEOUT", TORCH_TIMEOUT))
    except ValueError:
        return TORCH_TIMEOUT


def torch_from(process: subprocess.Popen, timeout: float | None = None) -> TorchFacts:
    import time

    timeout = torch_timeout() if timeout is None else timeout
    started = time.perf_counter()
    status, out, err = finish(process, timeout)
    seconds = time.perf_counter() - started
    if status == "timeout":
        return TorchFacts("timeout", detail=f"`import torch` did not finish within {timeout:.0f}s "
                                            f"(killed). Last output:\n{_tail(err) or '(none)'}", seconds=seconds)
    if status == "crashed":
        if "ModuleNotFoundError" in err and "'torch'" in err:
            return TorchFacts("missing", detail="torch is not installed", seconds=seconds)
        return TorchFacts("crashed", detail=f"`import torch` {describe_exit(process.returncode)}.\n{_tail(err)}",
                          seconds=seconds)
    try:
        data = json.loads(out)
        return TorchFacts("ok", data["version"], data.get("cuda") or "", bool(data.get("cuda_available")),
                          data.get("devices", []), data.get("warnings", []), seconds=seconds)
    except (ValueError, KeyError, TypeError) as exc:
        return TorchFacts("error", detail=f"the torch probe printed something unreadable ({exc}): {_tail(out, 3)}",
                          seconds=seconds)


def probe_torch(python: str | None = None, timeout: float | None = None) -> TorchFacts:
    """torch's version, CUDA build and devices, from a subprocess that may hang or die."""
    return torch_from(start_script(resolve_python(python), "torch_script.py"), timeout)


def start_imports(python: str, items: list[dict]) -> tuple[subprocess.Popen, list[dict]]:
    return start_script(python, "imports_script.py", stdin=True), items


def imports_from(started: tuple[subprocess.Popen, list[dict]], timeout: float = 120.0) -> list[dict]:
    process, items = started
    status, out, err = finish(process, timeout, json.dumps(items))
    if status != "ok":
        why = "timed out" if status == "timeout" else describe_exit(process.returncode)
        return [dict(item, ok=False, error=f"the import check {why}: {_tail(err, 2)}") for item in items]
    return json.loads(out)


def probe_imports(python: str | None, items: list[dict], timeout: float = 120.0) -> list[dict]:
    """Import checks in the target interpreter: items are {"statement": ...} (executed) or
    {"module": ...} (located only); each comes back with ok and error added."""
    return imports_from(start_imports(resolve_python(python), items), timeout)
