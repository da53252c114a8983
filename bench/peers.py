"""The llama.cpp peers of the engine benchmarks, built once into a cache folder.

- `llama-server`: built from the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python 0.3.36
  (the same llama.cpp as the Python bindings), `cmake --target llama-server`, about 9 minutes on 2 cores.

Batch-1 decode and prefill of llama.cpp are read from the same server's per-request `timings`, so the
Python bindings (which compile llama.cpp again, about 20 minutes) are not needed.

    python bench/peers.py            # build llama-server into bench/.cache/ (nothing if already there)

Each benchmark calls `llama_server()` and reports plainly when a peer is missing.

The build targets the instruction sets this CPU reports in /proc/cpuinfo, named one by one with
GGML_NATIVE=OFF and AMX off: with `-march=native` llama.cpp dies with SIGILL in its AMX kernel on the
Intel Xeons of this project's machines. The build folder is named after that set, so a cache carried to
another CPU builds again, and the binary is run once (`--version`) before it is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("LAMINA_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
VERSION = "0.3.36"
COMMIT = "0c1e57098"


# llama.cpp's CMake options for the x86 instruction sets, by the /proc/cpuinfo flag that says the CPU has it
ISA_OPTIONS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "avx512f": "GGML_AVX512",
               "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16",
               "avx_vnni": "GGML_AVX_VNNI"}


def isa_options() -> list[str]:
    """-D options for the instruction sets this CPU has (AMX always off: see the module docstring)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        flags = set()
    options = [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in ISA_OPTIONS.items()]
    return ["-DGGML_NATIVE=OFF", *options, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def _build_dir(src: Path) -> Path:
    on = [o.split("=")[0].removeprefix("-DGGML_").lower() for o in isa_options() if o.endswith("=ON")]
    return src / ("build-" + "-".join(on or ["generic"]))


def llama_server(build: bool = False) -> tuple[Path | None, str]:
    """(path to llama-server, note): the cached binary for this CPU, built first if `build`."""
    src = CACHE / "llama.cpp"
    binary = _build_dir(src) / "bin" / "llama-server"
    if binary.exists():
        check = subprocess.run([str(binary), "--version"], capture_output=True, timeout=60)
        if check.returncode != 0:
            return None, f"{binary} does not run on this CPU (exit {check.returncode}); delete {binary.parent.parent} and rebuild"
        return binary, (f"llama-server from llama-cpp-python {VERSION}'s vendored llama.cpp ({COMMIT}), built for "
                        f"{binary.parent.parent.name.removeprefix('build-')}, cached in {binary.parent}")
    if not build:
        return None, f"llama-server is not built; run `python bench/peers.py` (about 9 minutes) to build it into {CACHE}"
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return None, f"cannot build llama-server: {tool} is not installed"
    if not (src / "CMakeLists.txt").exists():
        dl = CACHE / "sdist"
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(dl)], check=True)
        archive = next(dl.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(dl, filter="data")
        vendored = dl / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(vendored, src)
    build_dir = _build_dir(src)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", *isa_options(), "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", f"-DLLAMA_BUILD_COMMIT={COMMIT}"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", "2"], check=True)
    return llama_server(build=False)


if __name__ == "__main__":
    path, note = llama_server(build=True)
    print(note)
    sys.exit(0 if path else 1)
