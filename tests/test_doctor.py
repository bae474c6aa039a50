"""`internlm-kit doctor` as a user runs it: the real CLI in a subprocess, against this project's
venv (real torch 2.13 CPU, transformers 5.24), fake nvidia-smi machines, fake torches that hang
or die, and model folders built per test. The throwaway-venv cases are in test_doctor_venvs.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.model_folders import CONFIG, LIGHT_REMOTE_CODE, MODELING_OK, make_model_folder, truncate

KIT = Path(sys.executable).with_name("internlm-kit")
PROJECT_PYTHON = sys.executable
CHECK_KEYS = {"id", "category", "status", "summary", "details", "fix"}


def doctor(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(KIT), "doctor", *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=timeout)


def doctor_json(*args: str, env: dict | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    result = doctor("--json", *args, env=env)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout), result


def by_id(report: dict) -> dict:
    return {c["id"]: c for c in report["checks"]}


def assert_contract(report: dict, result: subprocess.CompletedProcess) -> None:
    """The --json contract of the issue: the exact shape, a fix for every fail, exit code = ok."""
    assert set(report) == {"schema", "ok", "target", "checks"} and report["schema"] == 1
    for item in report["checks"]:
        assert set(item) == CHECK_KEYS
        assert item["status"] in {"ok", "warn", "fail", "skip", "error"}
        assert isinstance(item["details"], list)
        if item["status"] == "fail":
            assert item["fix"], item
        assert item["status"] != "error", item
    failed = any(c["status"] == "fail" for c in report["checks"])
    assert report["ok"] is not failed
    assert result.returncode == (1 if failed else 0)
    assert "Traceback" not in result.stderr


# --- a healthy environment -------------------------------------------------------------------

def test_the_project_venv_on_a_machine_without_gpu_is_ok(no_gpu):
    report, result = doctor_json(env=no_gpu)
    assert_contract(report, result)
    checks = by_id(report)
    assert report["ok"] is True and result.returncode == 0
    assert checks["packages.required"]["status"] == "ok"
    assert checks["packages.dependencies"]["status"] == "ok"
    assert checks["known-issues"]["status"] == "ok"
    assert checks["torch.import"]["status"] == "ok" and "2.13.0" in checks["torch.import"]["summary"]
    # No GPU is a reported state, not a failure.
    assert checks["torch.cuda-vs-gpu"]["status"] == "ok" and "no GPU" in checks["torch.cuda-vs-gpu"]["summary"]
    assert report["target"]["gpu"] == "none"
    # The default profile is the one matching what is installed, and the report says why.
    assert report["target"]["profile"] == "cpu"
    assert "transformers 5.24.0" in report["target"]["profile_reason"]
    assert all(c["status"] == "skip" for c in report["checks"] if c["id"].startswith("model."))


def test_the_text_report_groups_by_category_with_symbols_and_a_summary_line(no_gpu):
    result = doctor("--only", "python,packages,hf", env=no_gpu)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[✓] Hugging Face" in out and "Python environment" in out
    assert "✓ Python 3.11" in out
    assert out.strip().splitlines()[-1].startswith("No problems found:")
    verbose = doctor("--only", "hf.env", "-v", env=no_gpu).stdout
    assert "hf.env" in verbose  # ids are shown with -v


def test_list_checks_names_every_stable_id():
    result = doctor("--list-checks")
    assert result.returncode == 0
    ids = [line.split()[0] for line in result.stdout.splitlines()]
    assert ids == ["python.version", "packages.required", "packages.pins", "packages.dependencies",
                   "known-issues", "packages.transformers-range", "torch.import", "torch.cuda-vs-gpu", "torch.cuda-vs-driver", "gpu.memory",
                   "gpu.bf16", "system.disk", "system.ram", "hf.env", "model.config", "model.tokenizer",
                   "model.weights", "model.remote-code", "model.folder-name", "model.remote-code-imports",
                   "model.rehearsal.remote-code", "model.rehearsal.native"]


def test_only_runs_just_the_named_checks_and_does_not_import_torch(no_gpu):
    started = time.perf_counter()
    report, result = doctor_json("--only", "hf.env,system", env=no_gpu)
    assert [c["id"] for c in report["checks"]] == ["system.disk", "system.ram", "hf.env"]
    assert report["target"]["torch"] == "not checked"
    assert time.perf_counter() - started < 10


# --- the doctor cannot run: exit 2, one line, no traceback --------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--python", "/nowhere/bin/python"], "does not exist"),
    (["--python", "/bin/true", "--only", "hf.env"], "Could not read the environment"),
    (["--only", "no-such-check"], "There is no check 'no-such-check'"),
    (["--profile", "nonsense"], "no profile named 'nonsense'"),
    (["--dtype", "int3"], "--dtype int3"),
])
def test_bad_input_exits_2_with_a_reason_and_no_traceback(args, expected):
    result = doctor(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert result.stderr.startswith("internlm-kit: error:") and "fix:" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# --- fake GPUs -------------------------------------------------------------------------------

def test_a100_on_535_with_the_cpu_build_of_torch_fails_with_a_cuda_torch_fix(fake_gpu):
    report, result = doctor_json("--only", "torch,gpu", env=fake_gpu("a100-535"))
    assert_contract(report, result)
    checks = by_id(report)
    assert report["target"]["gpu"] == "NVIDIA A100-SXM4-80GB (driver 535.129.03, CUDA 12.2)"
    mismatch = checks["torch.cuda-vs-gpu"]
    assert mismatch["status"] == "fail" and "CPU build" in mismatch["summary"]
    # torch's current releases need a newer driver than 535; the profile built for CUDA 12.1 runs natively.
    assert "internlm-kit install --profile current" in mismatch["fix"]
    assert "--index-url https://download.pytorch.org/whl/cu1" in mismatch["fix"]
    assert checks["gpu.bf16"]["status"] == "ok"
    assert checks["gpu.memory"]["status"] == "ok" and "79.1 GiB free" in checks["gpu.memory"]["summary"]


def test_t4_has_no_bf16_a_warning_by_default_and_a_failure_when_asked_for(fake_gpu):
    env = fake_gpu("t4")
    report, result = doctor_json("--only", "gpu", env=env)
    assert_contract(report, result)
    bf16 = by_id(report)["gpu.bf16"]
    assert bf16["status"] == "warn" and "7.5" in bf16["summary"] and "float16" in bf16["fix"]
    assert "is_bf16_supported" in " ".join(bf16["details"])
    assert "float16" in by_id(report)["gpu.memory"]["summary"]
    report, result = doctor_json("--only", "gpu.bf16", "--dtype", "bfloat16", env=env)
    assert by_id(report)["gpu.bf16"]["status"] == "fail" and result.returncode == 1


def test_a_busy_gpu_without_room_for_the_model_fails(fake_gpu):
    report, result = doctor_json("--only", "gpu.memory", env=fake_gpu("a100-busy"))
    memory = by_id(report)["gpu.memory"]
    assert memory["status"] == "fail" and "only 1.8 GiB free" in memory["summary"]
    assert "nvidia-smi" in memory["fix"]
    report, _ = doctor_json("--only", "gpu.memory", "--dtype", "float32", env=fake_gpu("a100-busy"))
    assert "--dtype float16" in by_id(report)["gpu.memory"]["fix"]


def test_a_driver_older_than_the_torch_build_needs_fails_with_a_torch_for_that_driver(fake_gpu, fake_torch_venv):
    env = fake_gpu("v100-470")  # R470 rejects compute_cap: the doctor must retry without it
    python = fake_torch_venv("cuda-driver-too-old")  # torch 2.5.1+cu124 behaviour on that driver
    report, result = doctor_json("--python", str(python), "--only", "torch,gpu.bf16", env=env)
    assert_contract(report, result)
    checks = by_id(report)
    assert report["target"]["gpu"] == "Tesla V100-SXM2-16GB (driver 470.182.03, CUDA 11.4)"
    driver = checks["torch.cuda-vs-driver"]
    assert driver["status"] == "fail"
    assert "470.182.03 is too old for torch's CUDA 12.4 (needs >= 550.54.14)" in driver["summary"]
    # torch 2.5's oldest build, CUDA 11.8, runs on R470 under minor-version compatibility.
    assert f'{python} -m pip install "torch==2.5.1" --force-reinstall --index-url https://download.pytorch.org/whl/cu118' \
        in driver["fix"]
    gpu = checks["torch.cuda-vs-gpu"]
    assert gpu["status"] == "fail" and "too old" in gpu["summary"]
    assert any("found version 11040" in d for d in gpu["details"])
    assert checks["gpu.bf16"]["status"] == "warn" and "7.0" in checks["gpu.bf16"]["summary"]


def test_cuda_visible_devices_empty_hides_the_gpu(fake_gpu):
    env = dict(fake_gpu("a100-535"), CUDA_VISIBLE_DEVICES="")
    report, result = doctor_json("--only", "hf.env", env=env)
    check = by_id(report)["hf.env"]
    assert check["status"] == "fail" and "CUDA_VISIBLE_DEVICES=''" in check["summary"]
    assert check["fix"] == "unset CUDA_VISIBLE_DEVICES"


def test_hf_environment_problems_are_named(no_gpu):
    env = dict(no_gpu, HF_HUB_OFFLINE="1", HF_ENDPOINT="hf-mirror.com")
    report, _ = doctor_json("--only", "hf.env", env=env)
    check = by_id(report)["hf.env"]
    assert check["status"] == "fail" and "HF_ENDPOINT='hf-mirror.com' is not a URL" in check["summary"]
    assert "unset HF_HUB_OFFLINE" in check["fix"] and "https://hf-mirror.com" in check["fix"]


def test_secrets_never_appear_in_any_output(no_gpu):
    secrets = {"HF_TOKEN": "hf_SeCrEtVaLuE123456", "MY_API_KEY": "sk-another-secret-999",
               "HF_ENDPOINT": "https://user:pa55word-xyz@mirror.example.com"}
    env = dict(no_gpu, **secrets)
    outputs = [doctor("--json", "--only", "hf.env,known-issues", env=env).stdout,
               doctor("-v", "--only", "hf.env,known-issues", env=env).stdout]
    for out in outputs:
        for value in ("hf_SeCrEtVaLuE123456", "sk-another-secret-999", "pa55word-xyz"):
            assert value not in out
    assert "HF_TOKEN=<set, redacted>" in outputs[0]


# --- torch that hangs or dies: a failing check, never a doctor crash ------------------------------

@pytest.mark.parametrize("behaviour, expected", [
    ("hang", "did not finish within 3s"),
    ("exit", "exited with status 3"),
    ("segfault", "killed by SIGSEGV"),
    ("broken", "ModuleNotFoundError: No module named 'torch._C'"),
])
def test_a_torch_that_hangs_or_dies_is_a_failed_check(fake_torch_venv, no_gpu, behaviour, expected):
    python = fake_torch_venv(behaviour)
    env = dict(no_gpu, INTERNLM_KIT_TORCH_TIMEOUT="3")
    started = time.perf_counter()
    report, result = doctor_json("--python", str(python), "--only", "torch", env=env)
    assert time.perf_counter() - started < 30
    assert_contract(report, result)
    check = by_id(report)["torch.import"]
    assert check["status"] == "fail" and result.returncode == 1
    assert expected in "\n".join(check["details"])
    assert "--force-reinstall" in check["fix"]
    assert by_id(report)["torch.cuda-vs-gpu"]["status"] == "skip"


# --- model folders ---------------------------------------------------------------------------

def test_a_complete_model_folder_passes_every_model_check(tmp_path, no_gpu):
    path = make_model_folder(tmp_path / "internlm2-chat-1_8b", modeling=LIGHT_REMOTE_CODE,
                             configuration=LIGHT_REMOTE_CODE)
    # The folder's files, not a run: its tokenizer and code are stand-ins (the rehearsal has its own tests).
    static = "model.config,model.tokenizer,model.weights,model.remote-code,model.folder-name,model.remote-code-imports"
    report, result = doctor_json("--model", str(path), "--only", static + ",known-issues", env=no_gpu)
    assert_contract(report, result)
    assert {c["id"]: c["status"] for c in report["checks"]} == {
        "known-issues": "ok", "model.config": "ok", "model.tokenizer": "ok", "model.weights": "ok",
        "model.remote-code": "ok", "model.folder-name": "ok", "model.remote-code-imports": "ok"}


@pytest.mark.parametrize("damage, check_id, expected", [
    (lambda p: truncate(p / "model-00002-of-00002.safetensors", 0.6), "model.weights",
     "model-00002-of-00002.safetensors is truncated"),
    (lambda p: (p / "model-00001-of-00002.safetensors").unlink(), "model.weights",
     "model-00001-of-00002.safetensors named by the index is missing"),
    (lambda p: (p / "tokenizer.model").unlink(), "model.tokenizer", "neither tokenizer.model nor tokenizer.json"),
    (lambda p: (p / "config.json").write_text("{oops"), "model.config", "config.json cannot be read"),
])
def test_a_damaged_model_folder_fails_the_right_check(tmp_path, no_gpu, damage, check_id, expected):
    path = make_model_folder(tmp_path / "model")
    damage(path)
    report, result = doctor_json("--model", str(path), "--only", "model.config,model.tokenizer,model.weights",
                                 env=no_gpu)
    assert_contract(report, result)
    check = by_id(report)[check_id]
    assert check["status"] == "fail" and expected in check["summary"]
    # nothing names the repo: the kit's default model, said to be assumed (never a placeholder)
    assert f"internlm-kit download internlm/internlm2-chat-1_8b --local-dir {path}" in check["fix"]
    assert "OWNER/NAME" not in check["fix"]


def test_remote_code_importing_what_this_transformers_lacks_is_found_in_the_target(tmp_path, no_gpu):
    """A warning for the native engine (the default), one problem for --engine remote-code: never
    counted twice by the known-issue rule about the same import."""
    modeling = MODELING_OK + "from transformers.modeling_attn_mask_utils import AttentionMaskConverter\n"
    path = make_model_folder(tmp_path / "internlm2-chat-1_8b", modeling=modeling)
    only = ("--only", "model.remote-code-imports,known-issues")
    report, result = doctor_json("--model", str(path), *only, env=no_gpu)
    assert_contract(report, result)
    assert report["ok"] is True and result.returncode == 0
    check = by_id(report)["model.remote-code-imports"]
    assert check["status"] == "warn"
    assert "from transformers.modeling_attn_mask_utils import AttentionMaskConverter" in check["summary"]
    assert "No module named 'transformers.modeling_attn_mask_utils'" in check["summary"]
    assert "the native engine, internlm-kit chat's default, does not" in check["summary"]
    assert "internlm-kit chat --engine native" in check["fix"]
    assert "internlm-kit install --profile current" in check["fix"]
    # the imports every transformers has still resolve
    assert any(d.startswith("ok   from transformers.modeling_utils import PreTrainedModel") for d in check["details"])
    known = by_id(report)["known-issues"]
    assert known["status"] == "ok"
    assert "[remote-code-attn-mask-utils] left to model.remote-code-imports" in " ".join(known["details"])

    report, result = doctor_json("--model", str(path), "--engine", "remote-code", *only, env=no_gpu)
    assert_contract(report, result)
    assert result.returncode == 1
    assert {c["id"]: c["status"] for c in report["checks"]} == {"known-issues": "ok",
                                                              "model.remote-code-imports": "fail"}

    # Without the import check to report it, the rule is what says so, with the same severity.
    report, result = doctor_json("--model", str(path), "--only", "known-issues", env=no_gpu)
    known = by_id(report)["known-issues"]
    assert known["status"] == "warn" and result.returncode == 0
    assert "[remote-code-attn-mask-utils] you would see" in " ".join(known["details"])
    report, result = doctor_json("--model", str(path), "--only", "known-issues", "--engine", "remote-code",
                                 env=no_gpu)
    assert by_id(report)["known-issues"]["status"] == "fail" and result.returncode == 1


def test_a_healthy_tiny_model_on_the_cpu_stack_is_one_warning_not_a_failure(tiny_internlm2_dir, no_gpu):
    """The kit's own no-GPU stack (transformers 5.24) and a sound folder whose remote code, like the
    hub's, cannot import there: the native engine needs none of it, so the doctor passes."""
    report, result = doctor_json("--model", str(tiny_internlm2_dir), env=no_gpu)
    assert_contract(report, result)
    assert report["ok"] is True and result.returncode == 0
    # packages.pins may warn too: the dev venv takes the index's newest accelerate, not the cpu profile's pin.
    warnings = [c for c in report["checks"] if c["status"] == "warn" and c["id"] != "packages.pins"]
    assert [c["id"] for c in warnings] == ["model.remote-code-imports"]
    assert "native engine" in warnings[0]["summary"] and "trust_remote_code" in warnings[0]["summary"]
    text = doctor("--model", str(tiny_internlm2_dir), env=no_gpu)
    assert text.returncode == 0
    warned = sum(c["status"] == "warn" for c in report["checks"])
    assert text.stdout.strip().splitlines()[-1].startswith(
        f"No problems found: {warned} warning{'' if warned == 1 else 's'},")


def test_an_engine_the_doctor_does_not_know_is_a_usage_error():
    result = doctor("--engine", "vllm", "--only", "hf.env")
    assert result.returncode == 2 and "--engine vllm is not one of native, remote-code" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_dot_in_the_folder_name_with_remote_code_is_reported(tmp_path, no_gpu):
    path = make_model_folder(tmp_path / "internlm2-chat-1.8b")
    report, _ = doctor_json("--model", str(path), "--only", "model.folder-name", env=no_gpu)
    check = by_id(report)["model.folder-name"]
    assert check["status"] == "warn" and "contains '.'" in check["summary"]
    assert check["fix"] == f"mv '{path}' '{tmp_path / 'internlm2-chat-1_8b'}'"


# --- the preflight chat and serve run ---------------------------------------------------------

PREFLIGHT = """
import json, sys
from setup_kit.doctor import preflight
report = preflight({engine!r}, {model!r}, {device!r}, {dtype!r})
print(json.dumps({{"torch": "torch" in sys.modules,
                  "report": report.to_dict()}}))
"""


def run_preflight(engine: str, model, device="auto", dtype="auto", env=None) -> dict:
    code = PREFLIGHT.format(engine=engine, model=str(model) if model else None, device=device, dtype=dtype)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_preflight_imports_no_torch_and_checks_what_the_engine_needs(tmp_path, fake_gpu):
    """No torch import is what keeps the pre-flight quick; its time is benchmarks/doctor_speed.py's
    business, not a clock assertion that a loaded machine fails."""
    env = fake_gpu("t4")
    path = make_model_folder(tmp_path / "model")
    out = run_preflight("native", path, "cuda", "bfloat16", env=env)
    assert out["torch"] is False
    checks = by_id(out["report"])
    assert list(checks) == ["packages.required", "packages.dependencies", "packages.transformers-range",
                            "gpu.memory", "gpu.bf16",
                            "model.config", "model.tokenizer", "model.weights"]
    assert checks["packages.required"]["status"] == "ok"
    assert checks["packages.transformers-range"]["status"] == "ok"  # the dev stack is within the range
    assert checks["gpu.bf16"]["status"] == "fail"  # bfloat16 asked for on a T4
    assert out["report"]["ok"] is False

    truncate(path / "model-00001-of-00002.safetensors", 0.5)
    out = run_preflight("remote-code", path, "cpu", "auto", env=env)
    checks = by_id(out["report"])
    assert checks["model.weights"]["status"] == "fail"
    assert "model.remote-code" in checks and "known-issues" in checks
    assert "gpu.bf16" not in checks  # --device cpu: GPU checks do not matter


def test_the_remote_code_preflight_still_fails_where_the_remote_code_cannot_import(tiny_internlm2_dir, no_gpu):
    """The engine that runs the remote code is refused before loading, while the native engine's
    pre-flight on the same folder passes."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.24"):
        pytest.skip("this transformers still has modeling_attn_mask_utils")
    out = run_preflight("remote-code", tiny_internlm2_dir, "cpu", "auto", env=no_gpu)
    known = by_id(out["report"])["known-issues"]
    assert out["report"]["ok"] is False
    assert known["status"] == "fail" and "[remote-code-attn-mask-utils]" in " ".join(known["details"])
    assert "internlm-kit chat --engine native" in known["fix"]
    assert run_preflight("native", tiny_internlm2_dir, "cpu", "auto", env=no_gpu)["report"]["ok"] is True


def test_preflight_with_cuda_asked_for_on_a_machine_without_gpu(no_gpu):
    out = run_preflight("native", None, "cuda", "auto", env=no_gpu)
    assert by_id(out["report"])["gpu.memory"]["status"] == "fail"
    assert "--device cpu" in by_id(out["report"])["gpu.memory"]["fix"]


def _processes_running(fragment: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if fragment in cmdline:
            found.append(cmdline)
    return found


def test_ctrl_c_stops_the_doctor_and_leaves_no_probe_behind(fake_torch_venv, no_gpu):
    import signal

    python = fake_torch_venv("hang")
    process = subprocess.Popen([str(KIT), "doctor", "--python", str(python)], env=no_gpu,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probe = f"{python} {Path(__file__).parent.parent / 'setup_kit' / 'probe' / 'torch_script.py'}"
    deadline = time.time() + 20
    while not _processes_running(probe) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_running(probe), "the torch probe never started"
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err
    deadline = time.time() + 10  # the probe is killed as the doctor exits; a loaded machine reaps it late
    while _processes_running(probe) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_running(probe) == []


OLD_PYTHON = next((p for p in (Path("/root/.pyenv/versions/3.8.18/bin/python"), Path("/usr/bin/python3.9"))
                   if p.exists()), None)


@pytest.mark.skipif(OLD_PYTHON is None, reason="needs a Python 3.8 or 3.9 interpreter")
def test_a_python_no_profile_supports_is_a_warning_with_the_versions_that_work(no_gpu):
    report, result = doctor_json("--python", str(OLD_PYTHON), "--only", "python", env=no_gpu)
    check = by_id(report)["python.version"]
    assert check["status"] == "warn" and "no profile in envs/ supports this Python" in check["summary"]
    assert "Python 3.10 or 3.11" in check["fix"]
    assert result.returncode == 0  # a warning is not a failure


def test_without_nvml_or_nvidia_smi_the_gpu_comes_from_libcuda(fake_libcuda_dir, no_gpu):
    env = dict(no_gpu, LD_LIBRARY_PATH=str(fake_libcuda_dir))
    report, result = doctor_json("--only", "gpu,torch.cuda-vs-gpu", env=env)
    assert_contract(report, result)
    assert report["target"]["gpu"] == "NVIDIA A100-SXM4-80GB"
    checks = by_id(report)
    assert checks["gpu.bf16"]["status"] == "ok" and "(8.0)" in checks["gpu.bf16"]["summary"]
    assert checks["gpu.memory"]["status"] == "ok"
    assert checks["torch.cuda-vs-gpu"]["status"] == "fail"  # the real CPU torch on a machine with a GPU


def test_with_only_libcuda_torch_cuda_is_compared_with_the_drivers_cuda(fake_libcuda_dir, fake_torch_venv, no_gpu):
    python = fake_torch_venv("cuda-driver-too-old")  # built for CUDA 12.4; the fake driver supports 12.2
    env = dict(no_gpu, LD_LIBRARY_PATH=str(fake_libcuda_dir))
    report, result = doctor_json("--python", str(python), "--only", "torch.cuda-vs-driver", env=env)
    assert_contract(report, result)
    check = by_id(report)["torch.cuda-vs-driver"]
    assert check["status"] == "warn" and "CUDA 12.4 is newer than the driver's 12.2" in check["summary"]
    assert ">= 550.54.14" in check["fix"]


def test_nvml_is_the_first_source_and_a_broken_one_falls_back_to_nvidia_smi(fake_pynvml, fake_gpu):
    env = fake_gpu("t4")
    report, _ = doctor_json("--only", "gpu", env=dict(env, PYTHONPATH=str(fake_pynvml("h100x2-550"))))
    assert report["target"]["gpu"] == "NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3 (driver 550.54.15, CUDA 12.4)"
    memory = by_id(report)["gpu.memory"]
    assert memory["status"] == "ok" and memory["summary"].startswith("GPU 0 (NVIDIA H100 80GB HBM3) has 79.2 GiB free")
    report, _ = doctor_json("--only", "gpu", env=dict(env, PYTHONPATH=str(fake_pynvml("no-driver"))))
    assert report["target"]["gpu"] == "Tesla T4 (driver 535.104.05, CUDA 12.2)"


def test_an_r470_driver_with_the_cpu_torch_is_told_which_older_torch_it_runs(fake_gpu):
    report, result = doctor_json("--only", "torch.cuda-vs-gpu", env=fake_gpu("v100-470"))
    check = by_id(report)["torch.cuda-vs-gpu"]
    assert check["status"] == "fail" and "Tesla V100-SXM2-16GB" in check["summary"]
    assert '-m pip install "torch==2.7.*" --index-url https://download.pytorch.org/whl/cu118' in check["fix"]
    assert "Update the NVIDIA driver" in check["fix"]


def test_the_fix_for_a_truncated_shard_names_the_repo_config_json_names(tmp_path, no_gpu):
    path = make_model_folder(tmp_path / "m7" / "ckpt", config={**CONFIG, "_name_or_path": "internlm/internlm2-chat-7b"})
    truncate(path / "model-00001-of-00002.safetensors", 0.5)
    report, result = doctor_json("--model", str(path), "--only", "model.weights", env=no_gpu)
    assert_contract(report, result)
    check = by_id(report)["model.weights"]
    assert check["status"] == "fail" and "truncated" in check["summary"]
    assert f"internlm-kit download internlm/internlm2-chat-7b --local-dir {path}" in check["fix"]
    assert "_name_or_path" in check["fix"]  # a guess, and the fix says where it comes from


def test_a_folder_that_is_not_a_model_is_one_problem_with_one_fix(tmp_path, no_gpu):
    path = tmp_path / "x"
    path.mkdir()
    (path / "notes.txt").write_text("not a model\n")
    report, result = doctor_json("--model", str(path), "--only", "model", env=no_gpu)
    assert_contract(report, result)
    failed = [c for c in report["checks"] if c["status"] in ("fail", "warn")]
    assert [c["id"] for c in failed] == ["model.config"]
    assert "not a model folder" in failed[0]["summary"]
    assert len(failed[0]["fix"].splitlines()) == 1 and "--model" in failed[0]["fix"]
    assert {c["id"]: c["status"] for c in report["checks"]}["model.weights"] == "skip"


def test_piped_report_keeps_whole_lines_and_counts_read_naturally(tiny_internlm2_dir, no_gpu):
    report, _ = doctor_json("--model", str(tiny_internlm2_dir), "--only", "model.weights")
    assert re.match(r"2 shards, 0\.\dM parameters", by_id(report)["model.weights"]["summary"])  # not "0.00B"
    human = doctor("--model", str(tiny_internlm2_dir))  # stdout is a pipe here
    assert all(not line.startswith(("x86_64", "aarch64")) for line in human.stdout.splitlines())
    first = human.stdout.splitlines()[0]
    assert first.startswith("internlm-kit doctor for ") and first.rstrip().endswith(")")  # not cut at 80 columns
