"""`--backend lmdeploy|vllm`: hand the same model folder to LMDeploy's api_server or `vllm serve`.

For users who outgrow one process or one GPU. The kit builds the command line, runs it as a child
process with its output going straight to the terminal, and exits with the child's exit code. When
the package is missing, it says exactly what to install for this machine's CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from setup_kit import dtypes
from setup_kit.errors import KitError

TORCH_INDEX = "https://download.pytorch.org/whl/cu{}"
# vLLM's wheels are built against CUDA 12.x/13.x torch builds published on the PyTorch index.
VLLM_CUDA_BUILDS = ("126", "128", "129", "130")
# LMDeploy's PyPI wheel is built for CUDA 12; CUDA 11 users take the +cu118 wheel from its releases.
LMDEPLOY_CU118_VERSION = "0.7.1"
DTYPES = dtypes.TORCH_NAMES


@dataclass
class BackendCommand:
    argv: list[str]
    env: dict[str, str]  # extra environment for the child (secrets go here, not in argv)

    def shown(self) -> str:
        return " ".join(_quote(a) for a in self.argv)


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./:=@" for c in arg) else json.dumps(arg)


def executable(name: str) -> str | None:
    """The backend's console script: beside this Python first (same venv), then on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None and executable(name) is not None


def lmdeploy_command(exe: str, model_dir: Path, *, name: str, host: str, port: int, tp: int,
                     api_key: str | None = None, dtype: str = "auto") -> BackendCommand:
    argv = [exe, "serve", "api_server", str(model_dir), "--server-name", host, "--server-port", str(port),
            "--tp", str(tp), "--model-name", name]
    if dtype in ("bf16", "fp16"):
        argv += ["--dtype", DTYPES[dtype]]
    if api_key:
        # LMDeploy takes keys only as an argument: they show in `ps` on this machine.
        argv += ["--api-keys", api_key]
    return BackendCommand(argv, {})


def vllm_command(exe: str, model_dir: Path, *, name: str, host: str, port: int, tp: int,
                 api_key: str | None = None, dtype: str = "auto") -> BackendCommand:
    argv = [exe, "serve", str(model_dir), "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(tp), "--served-model-name", name]
    if dtype in DTYPES:
        argv += ["--dtype", DTYPES[dtype]]
    return BackendCommand(argv, {"VLLM_API_KEY": api_key} if api_key else {})


def cuda_version() -> tuple[str, str]:
    """(CUDA version like "12.4" or "", where it came from): torch's build, else the driver's."""
    try:
        import torch

        if torch.version.cuda:
            return torch.version.cuda, f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
    except Exception:  # a broken torch must not hide the install hint
        pass
    from setup_kit.probe.gpu import probe_gpu

    facts = probe_gpu()
    if facts.cuda_driver_version:
        return facts.cuda_driver_version, f"the NVIDIA driver supports up to CUDA {facts.cuda_driver_version}"
    return "", "no NVIDIA GPU or CUDA build of torch was found on this machine"


def install_command(backend: str, cuda: str, python: tuple[int, int] | None = None) -> str:
    """The pip command that installs `backend` for this CUDA version (a best match of its builds)."""
    major, _, minor = cuda.partition(".")
    pyver = "".join(map(str, python or sys.version_info[:2]))
    pip = f"{Path(sys.executable)} -m pip install"
    if backend == "lmdeploy":
        if major == "11":
            version = LMDEPLOY_CU118_VERSION
            wheel = (f"https://github.com/InternLM/lmdeploy/releases/download/v{version}/"
                     f"lmdeploy-{version}+cu118-cp{pyver}-cp{pyver}-manylinux2014_x86_64.whl")
            return f"{pip} {wheel} --extra-index-url {TORCH_INDEX.format('118')}"
        return f"{pip} lmdeploy"
    if major and major.isdigit() and int(major) >= 12:
        wanted = f"{major}{minor or '0'}"
        # The newest build the CUDA here can run (a build newer than the driver's CUDA will not load).
        fits = [b for b in VLLM_CUDA_BUILDS if int(b) <= int(wanted)] or [VLLM_CUDA_BUILDS[0]]
        return f"{pip} vllm --extra-index-url {TORCH_INDEX.format(fits[-1])}"
    return f"{pip} vllm"


def missing_backend_error(backend: str) -> KitError:
    cuda, source = cuda_version()
    command = install_command(backend, cuda)
    label = {"lmdeploy": "LMDeploy", "vllm": "vLLM"}[backend]
    extra = ""
    if not cuda:
        extra = (f" {label} needs an NVIDIA GPU with CUDA; on this machine use the kit's own server "
                 "(--backend kit, the default).")
    elif backend == "vllm" and cuda.startswith("11"):
        extra = " Current vLLM wheels need CUDA 12 or newer: update the driver, or use --backend lmdeploy."
    return KitError(f"--backend {backend} needs the `{backend}` package, which is not installed in this "
                    f"environment ({source}).{extra}",
                    fix=f"Install it with: {command}   (then run the same serve command again)")


def llama_folder_for_vllm(model_dir: Path) -> Path:
    """vLLM loads the Llama layout without remote code: convert an InternLM2 folder once, beside it."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "internlm2":
        return model_dir
    target = model_dir.with_name(model_dir.name + "-llama")
    if (target / "config.json").is_file() and json.loads((target / "config.json").read_text()).get(
            "model_type") == "llama":
        return target
    from setup_kit.convert import convert_checkpoint

    print(f"internlm-kit serve: converting {model_dir} to the Llama layout for vLLM: {target}", file=sys.stderr)
    convert_checkpoint(model_dir, target)
    return target


def run_backend(backend: str, model_dir: Path, *, name: str, host: str, port: int, tp: int,
                api_key: str | None, dtype: str) -> int:
    exe = executable(backend) if importlib.util.find_spec(backend) is not None else None
    if exe is None:
        raise missing_backend_error(backend)
    if backend == "vllm":
        model_dir = llama_folder_for_vllm(model_dir)
        command = vllm_command(exe, model_dir, name=name, host=host, port=port, tp=tp, api_key=api_key,
                               dtype=dtype)
    else:
        command = lmdeploy_command(exe, model_dir, name=name, host=host, port=port, tp=tp, api_key=api_key,
                                   dtype=dtype)
    shown = command.shown().replace(api_key, "***") if api_key else command.shown()
    print(f"internlm-kit serve: running {shown}", file=sys.stderr, flush=True)
    return run_child(command)


def run_child(command: BackendCommand) -> int:
    """Run the server in the foreground; Ctrl-C reaches it too (same process group), we wait for it."""
    child = subprocess.Popen(command.argv, env={**os.environ, **command.env})
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
    return code if code >= 0 else 128 - code
