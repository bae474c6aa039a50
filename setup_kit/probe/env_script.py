"""Facts about the Python environment that runs this file, as JSON on stdout.

Run by the *target* interpreter (``python env_script.py``), so it uses the standard library only
and stays valid on Python 3.8. Secrets never leave this process: values of variables whose
names look secret are replaced before printing. Also imported in-process by the preflight.
"""

import json
import os
import platform
import re
import sys

try:
    from importlib import metadata
except ImportError:  # Python < 3.8: nothing to read distributions with
    sys.stderr.write("Python {0} is too old: the doctor reads importlib.metadata (Python >= 3.8)\n".format(
        platform.python_version()))
    sys.exit(3)

RELEVANT_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "CUDA_",
                     "NVIDIA_", "PIP_", "UV_", "INTERNLM_KIT_", "MODELSCOPE_")
RELEVANT_NAMES = ("LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX",
                  "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "XDG_CACHE_HOME", "HOME",
                  "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy")
SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
URL_USERINFO = re.compile(r"(://[^/@:\s]*):[^/@\s]*@")
REDACTED = "<set, redacted>"


def redact(name, value):
    """What may be shown of an environment variable's value."""
    if SECRET_NAME.search(name):
        return REDACTED if value else ""
    return URL_USERINFO.sub(r"\1:<redacted>@", value)


def relevant_environment(environ=None):
    environ = os.environ if environ is None else environ
    return {name: redact(name, value) for name, value in sorted(environ.items())
            if name.startswith(RELEVANT_PREFIXES) or name in RELEVANT_NAMES}


def marker_environment():
    """PEP 508 marker values, so Requires-Dist markers are evaluated for the target."""
    info = sys.implementation.version
    impl_version = "{0.major}.{0.minor}.{0.micro}".format(info)
    if info.releaselevel != "final":
        impl_version += info.releaselevel[0] + str(info.serial)
    return {
        "implementation_name": sys.implementation.name,
        "implementation_version": impl_version,
        "os_name": os.name,
        "platform_machine": platform.machine(),
        "platform_release": platform.release(),
        "platform_system": platform.system(),
        "platform_version": platform.version(),
        "python_full_version": platform.python_version(),
        "platform_python_implementation": platform.python_implementation(),
        "python_version": ".".join(platform.python_version_tuple()[:2]),
        "sys_platform": sys.platform,
    }


def _dist_path(dist):
    path = getattr(dist, "_path", None)  # the .dist-info / .egg-info folder (PathDistribution)
    return str(path) if path is not None else ""


def distributions(unreadable=None):
    """Installed distributions, first on sys.path wins (as for imports and pip). Those whose
    metadata cannot be read are not dropped silently: each goes into `unreadable` (its folder and
    why), for the doctor to name, since pip check cannot see their requirements either."""
    found = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception as exc:
            name, why = None, "{0}: {1}".format(type(exc).__name__, exc)
        else:
            why = "its METADATA has no Name"
        if not name:
            if unreadable is not None:
                unreadable.append({"path": _dist_path(dist), "error": why})
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            requires = list(dist.requires or [])
        except Exception as exc:
            requires = []
            if unreadable is not None:
                unreadable.append({"path": _dist_path(dist), "name": name, "version": dist.version,
                                   "error": "its requirements cannot be read ({0}: {1})".format(
                                       type(exc).__name__, exc)})
        found[key] = {"name": name, "version": dist.version, "requires": requires}
    return sorted(found.values(), key=lambda d: d["name"].lower())


def collect():
    libc = platform.libc_ver()
    unreadable = []
    return {
        "python": {
            "version": platform.python_version(),
            "executable": sys.executable,
            "prefix": sys.prefix,
            "base_prefix": getattr(sys, "base_prefix", sys.prefix),
            "implementation": platform.python_implementation(),
            "in_virtualenv": getattr(sys, "base_prefix", sys.prefix) != sys.prefix,
            "path": [p for p in sys.path if p],
        },
        "platform": {
            "system": platform.system(),
            "machine": platform.machine(),
            "release": platform.release(),
            "libc": "{0} {1}".format(*libc).strip(),
        },
        "markers": marker_environment(),
        "distributions": distributions(unreadable),
        "unreadable_distributions": unreadable,
        "environment": relevant_environment(),
    }


if __name__ == "__main__":
    sys.stdout.write(json.dumps(collect()))
