"""llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built once
from the llama.cpp tree vendored in the `llama-cpp-python` source package of the version installed
here, into $COMPRESSOR_HOME/llama-cpp-tools/<version>/ (~10 min on 2 cores, then cached).

A tool we did not write is the outside anchor for every quantization figure: its quantizer makes
the files a llama.cpp user would pick, its imatrix is computed on the same calibration text as
ours. The `llamacpp` stage and the ladder bench run them; CI builds none of it (their tests
skip where the tools are not built).

    python -m compressor.llamacpp_tools      # build (or find) the tools and print where they are
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


BUILD = "python -m compressor.llamacpp_tools"  # what a user runs to build them


def tools_dir() -> Path:
    """$COMPRESSOR_LLAMACPP_TOOLS (a folder whose bin/ holds the tools: a llama.cpp build of your
    own), else our build for the installed llama-cpp-python in the cache."""
    from .storage import home

    if os.environ.get("COMPRESSOR_LLAMACPP_TOOLS"):
        return Path(os.environ["COMPRESSOR_LLAMACPP_TOOLS"]).expanduser()

    version = importlib.metadata.version("llama_cpp_python")
    return home() / "llama-cpp-tools" / version


def missing_tool(tool: str) -> str | None:
    """Why `tool` cannot run here (one line with what would work), or None when it is built."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"{tool} builds from llama-cpp-python's source package: pip install 'compressor[llamacpp]', then {BUILD}"
    if not (tools_dir() / "bin" / tool).is_file():
        return f"{tool} is not built here: {BUILD} builds llama.cpp's tools once (~10 min on 2 cores)"
    return None


def ensure_tools() -> Path:
    """The folder holding the three tools (and their shared libraries), built if missing."""
    out = tools_dir()
    if all((out / "bin" / t).is_file() for t in TOOLS):
        return out
    version = out.name
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"building llama.cpp's tools needs {', '.join(missing)} (apt install cmake g++)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"llama.cpp tools: fetching the llama-cpp-python {version} source package", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(tmp)]
            + [f"llama-cpp-python=={version}"],
            check=True,
        )
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = tmp / "build"
        print("llama.cpp tools: cmake configure + build (~10 min on 2 cores)", flush=True)
        flags = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
        flags += ["-DLLAMA_BUILD_SERVER=OFF"]
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *flags], check=True)
        subprocess.run(["cmake", "--build", str(build), "-j2", "--target", *TOOLS], check=True)
        staged = out.with_name(out.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(build / "bin", staged / "bin")
        shutil.rmtree(out, ignore_errors=True)
        staged.rename(out)
    return out


def run_tool(tool: str, *args: str, log: Path | None = None) -> str:
    """Run one tool with its shared libraries beside it; its output (stderr merged) as text."""
    folder = ensure_tools() / "bin"
    env = {"LD_LIBRARY_PATH": str(folder), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(folder / tool), *args], env=env, capture_output=True, text=True)
    text = done.stdout + done.stderr
    if log is not None:
        log.write_text(text)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} failed ({done.returncode}): {text[-2000:]}")
    return text


if __name__ == "__main__":
    print(ensure_tools())
