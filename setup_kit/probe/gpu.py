"""GPU and driver facts without torch: NVML (nvidia-ml-py) if importable, else `nvidia-smi`,
else `libcuda.so.1` through ctypes. No GPU is a fact (``source="none"``), not an error."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

QUERY_FIELDS = "index,name,driver_version,memory.total,memory.free,compute_cap"
CUDA_VERSION_LINE = re.compile(r"CUDA Version:\s*([0-9]+\.[0-9]+)")


@dataclass
class Gpu:
    index: int
    name: str
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None
    capability: str = ""  # "8.0"; empty when the source cannot say


@dataclass
class GpuFacts:
    source: str = "none"  # nvml | nvidia-smi | libcuda | none
    driver_version: str = ""  # "535.129.03"
    cuda_driver_version: str = ""  # the newest CUDA the driver supports, "12.2"
    gpus: list[Gpu] = field(default_factory=list)
    error: str = ""  # why a source that exists gave nothing

    def to_dict(self) -> dict:
        return asdict(self)


def cuda_version_from_int(value: int) -> str:
    """NVML / cuDriverGetVersion encode 12.4 as 12040."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def from_nvml() -> GpuFacts | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return GpuFacts(source="none", error=f"NVML: {exc}")
    try:
        facts = GpuFacts(source="nvml")
        facts.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        getter = getattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", pynvml.nvmlSystemGetCudaDriverVersion)
        facts.cuda_driver_version = cuda_version_from_int(getter())
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            facts.gpus.append(Gpu(index, _text(pynvml.nvmlDeviceGetName(handle)),
                                  memory.total // 2**20, memory.free // 2**20, f"{major}.{minor}"))
        return facts
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def parse_query_csv(text: str, with_capability: bool) -> list[tuple[Gpu, str]]:
    """Rows of `--query-gpu=... --format=csv,noheader,nounits` -> (Gpu, driver version)."""
    rows = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 5:
            continue
        capability = cells[5] if with_capability and len(cells) > 5 else ""
        rows.append((Gpu(int(cells[0]), cells[1], _int(cells[3]), _int(cells[4]),
                         "" if capability.startswith("[") else capability), cells[2]))
    return rows


def _int(cell: str) -> int | None:
    try:
        return int(float(cell))
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def from_nvidia_smi(timeout: float = 10.0) -> GpuFacts | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    fields = QUERY_FIELDS
    header = None
    try:
        # The query and the plain header (which carries "CUDA Version") run side by side.
        header = subprocess.Popen([exe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        query = _run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], timeout)
        if query.returncode != 0 and "compute_cap" in (query.stdout + query.stderr):
            # Drivers older than R510 reject the compute_cap field and fail the whole query.
            fields = QUERY_FIELDS.rsplit(",", 1)[0]
            query = _run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], timeout)
        header_out, _ = header.communicate(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if header is not None and header.poll() is None:
            header.kill()
            header.wait()
        return GpuFacts(source="none", error=f"nvidia-smi: {exc}")
    if query.returncode != 0:
        message = (query.stdout + query.stderr).strip().splitlines()
        return GpuFacts(source="none", error=f"nvidia-smi failed: {message[0] if message else query.returncode}")
    facts = GpuFacts(source="nvidia-smi")
    for gpu, driver in parse_query_csv(query.stdout, fields == QUERY_FIELDS):
        facts.gpus.append(gpu)
        facts.driver_version = driver
    if match := CUDA_VERSION_LINE.search(header_out or ""):
        facts.cuda_driver_version = match.group(1)
    return facts


def from_libcuda() -> GpuFacts | None:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    facts = GpuFacts(source="libcuda")
    version, count = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0:
        facts.error = "libcuda.so.1 is present but cuInit failed (driver not loaded?)"
    if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
        facts.cuda_driver_version = cuda_version_from_int(version.value)
    if not facts.error and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0:
        for index in range(count.value):
            device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
            cuda.cuDeviceGet(ctypes.byref(device), index)
            cuda.cuDeviceGetName(name, 256, device)
            total, major, minor = ctypes.c_size_t(), ctypes.c_int(), ctypes.c_int()
            cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device)
            cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
            facts.gpus.append(Gpu(index, name.value.decode(), total.value // 2**20, None,
                                  f"{major.value}.{minor.value}"))
    return facts


def probe_gpu(timeout: float = 10.0) -> GpuFacts:
    errors = []
    for source in (from_nvml, lambda: from_nvidia_smi(timeout), from_libcuda):
        facts = source()
        if facts is not None and facts.source != "none":
            return facts
        if facts is not None and facts.error:
            errors.append(facts.error)
    return GpuFacts(error="; ".join(errors))
