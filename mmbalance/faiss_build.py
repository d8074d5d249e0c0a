"""Which faiss build is installed, and the one step that swaps the CPU build for the GPU one.

``faiss-cpu`` (a base dependency, so ``pip install mmbalance`` clusters out of the box) and
``faiss-gpu-cu12`` both install the same ``faiss/`` package files: installed together, whichever pip
unpacked last wins and uninstalling either breaks the other. So the GPU build is never an extra
installed beside the CPU one; it *replaces* it:

    python -m mmbalance.faiss_build --use gpu            # uninstall faiss-cpu, install faiss-gpu-cu12
    python -m mmbalance.faiss_build                      # JSON: distributions, GPU build, GPUs seen
    python -m mmbalance.faiss_build --require-gpus 1     # exit 1 unless faiss sees a GPU (GPU nodes)

Reinstalling mmbalance afterwards brings faiss-cpu back beside the GPU build; ``check`` reports that
state as an error naming the fix.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys

CPU_REQUIREMENT = "faiss-cpu>=1.8"
GPU_REQUIREMENT = "faiss-gpu-cu12>=1.8,<2"
# pip distributions that install the top-level ``faiss`` package (PyPI names, normalised)
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss-gpu-cu12-cuvs",
                       "faiss-cuda", "faiss-cuda-cu128", "faiss-cpu-noavx2", "faiss")


class FaissInstallError(RuntimeError):
    """The faiss installation is missing or ambiguous; the message is one line with the fix."""


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_distributions() -> dict[str, str]:
    """{distribution name: version} of every installed pip distribution that provides ``faiss``."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = _normalise(dist.metadata.get("Name") or "")
        if name in FAISS_DISTRIBUTIONS:
            found[name] = dist.version
    return dict(sorted(found.items()))


def check_installation(installed: dict[str, str] | None = None) -> None:
    """Raise ``FaissInstallError`` unless exactly one faiss distribution is installed."""
    installed = installed_distributions() if installed is None else installed
    if not installed:
        raise FaissInstallError(
            "faiss is not installed: pip install faiss-cpu (or python -m mmbalance.faiss_build --use gpu on a CUDA 12 node)"
        )
    if len(installed) > 1:
        names = " ".join(installed)
        raise FaissInstallError(
            f"{len(installed)} faiss builds are installed ({', '.join(f'{k} {v}' for k, v in installed.items())}); they "
            f"overwrite each other's files, so which one imports is undefined: pip uninstall -y {names}, then "
            f"python -m mmbalance.faiss_build --use gpu (or cpu)"
        )


def import_faiss():
    """``import faiss`` for mmbalance's modules: one build installed, else a one-line error with the fix."""
    installed = installed_distributions()
    check_installation(installed)
    try:
        import faiss
    except ImportError as err:
        raise FaissInstallError(f"import faiss failed ({', '.join(installed)} installed): {str(err).splitlines()[0]}") from None
    return faiss


def describe() -> dict:
    """The installed distributions, the imported module, whether it has GPU support and how many GPUs it sees."""
    out: dict = {"distributions": installed_distributions()}
    try:
        import faiss
    except ImportError as err:
        out["import_error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
        return out
    gpu_build = hasattr(faiss, "StandardGpuResources")
    out.update({"module": faiss.__file__, "version": faiss.__version__, "gpu_build": gpu_build,
                "num_gpus": int(faiss.get_num_gpus()) if gpu_build else 0})
    return out


def replacement_commands(target: str, installed: dict[str, str], python: str = sys.executable) -> list[list[str]]:
    """pip commands that leave exactly the ``target`` ('cpu' | 'gpu') build installed.

    Every faiss distribution is uninstalled first (their files overlap, so a build installed over
    another, or removed after it, leaves a mix), then the target is installed with its dependencies
    (the CUDA runtime and cuBLAS wheels for the GPU build).
    """
    if target not in ("cpu", "gpu"):
        raise ValueError(f"faiss build must be 'cpu' or 'gpu', not {target!r}")
    requirement = GPU_REQUIREMENT if target == "gpu" else CPU_REQUIREMENT
    commands = []
    if installed:
        commands.append([python, "-m", "pip", "uninstall", "-y", *installed])
    commands.append([python, "-m", "pip", "install", requirement])
    return commands


def use(target: str) -> None:
    for cmd in replacement_commands(target, installed_distributions()):
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmbalance.faiss_build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--use", choices=["cpu", "gpu"], help="replace the installed faiss build with this one")
    ap.add_argument("--require-gpu-build", action="store_true", help="exit 1 unless faiss has GPU support (no GPU needed)")
    ap.add_argument("--require-gpus", type=int, default=0, metavar="N", help="exit 1 unless faiss sees at least N GPUs")
    ap.add_argument("--torch", action="store_true", help="also report torch's CUDA devices (and require N of them)")
    args = ap.parse_args(argv)
    if args.use:
        use(args.use)
    report = describe()
    if args.torch:
        try:
            import torch

            report["torch"] = {"version": torch.__version__, "cuda_devices": torch.cuda.device_count()}
        except ImportError as err:
            report["torch"] = {"import_error": str(err).splitlines()[0]}
    print(json.dumps(report, sort_keys=True), flush=True)
    problems = []
    try:
        check_installation(report["distributions"])
    except FaissInstallError as err:
        problems.append(str(err))
    if "import_error" in report and report["distributions"]:
        problems.append(f"import faiss failed: {report['import_error']}")
    if (args.require_gpu_build or args.require_gpus) and not report.get("gpu_build", False):
        problems.append(f"faiss has no GPU support ({', '.join(report['distributions']) or 'no build'} installed): "
                        f"python -m mmbalance.faiss_build --use gpu")
    elif args.require_gpus and report.get("num_gpus", 0) < args.require_gpus:
        problems.append(f"faiss sees {report.get('num_gpus', 0)} GPUs, {args.require_gpus} required "
                        f"(no GPU visible to this process: docker run --gpus all, or a GPU node)")
    if args.torch and args.require_gpus and report["torch"].get("cuda_devices", 0) < args.require_gpus:
        problems.append(f"torch sees {report['torch'].get('cuda_devices', 0)} CUDA devices, {args.require_gpus} required")
    for problem in problems:
        print(f"faiss_build: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
