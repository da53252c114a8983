"""The llama.cpp peers of the engine benchmarks, built once into a cache folder.

- `llama-server`: built from the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python 0.3.36
  (the same llama.cpp as the Python bindings), `cmake --target llama-server`, about 9 minutes on 2 cores.

Batch-1 decode and prefill of llama.cpp are read from the same server's per-request `timings`, so the
Python bindings (which compile llama.cpp again, about 20 minutes) are not needed.

    python bench/peers.py            # build llama-server into bench/.cache/ (nothing if already there)

Each benchmark calls `llama_server()` and reports plainly when a peer is missing.
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


def llama_server(build: bool = False) -> tuple[Path | None, str]:
    """(path to llama-server, note): the cached binary, built first if `build`."""
    binary = CACHE / "llama.cpp" / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary, f"llama-server from llama-cpp-python {VERSION}'s vendored llama.cpp ({COMMIT}), cached in {binary.parent}"
    if not build:
        return None, f"llama-server is not built; run `python bench/peers.py` (about 9 minutes) to build it into {CACHE}"
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return None, f"cannot build llama-server: {tool} is not installed"
    src = CACHE / "llama.cpp"
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
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", f"-DLLAMA_BUILD_COMMIT={COMMIT}"], check=True)
    subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama-server", "-j", "2"], check=True)
    return llama_server(build=False)


if __name__ == "__main__":
    path, note = llama_server(build=True)
    print(note)
    sys.exit(0 if path else 1)
