#!/usr/bin/env bash
# Optional benchmark dependency, not part of CI (.ci/run and scripts/test never call this):
# llama.cpp through llama-cpp-python, built from source for this CPU, in its own venv `.venv-llamacpp`,
# plus the Hugging Face -> GGUF converter of the same llama.cpp tree and what it imports.
# Used by bench/llama_cpp.py. The build takes 3-10 minutes on 2 quiet cores (33 on a shared machine); a second
# run does nothing.
#
#   scripts/setup-llama-cpp.sh                                 # LLAMA_CPP_PYTHON_VERSION=... to change the version
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PYTHON=${PYTHON:-python3}
VENV=.venv-llamacpp
SRC="$VENV/src/llama_cpp_python-$VERSION"
stamp="$VENV/.installed-$VERSION"
if [ -f "$stamp" ]; then
  echo "llama-cpp-python $VERSION already set up in $VENV (converter: $SRC/vendor/llama.cpp/convert_hf_to_gguf.py)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/pip" install --disable-pip-version-check)

# The sdist carries llama.cpp (vendor/llama.cpp) with convert_hf_to_gguf.py and gguf-py: fetch it once, build
# the package from that very file, and keep the extracted tree for the converter, so both are one version.
mkdir -p "$VENV/src"
sdist="$VENV/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  "$VENV/bin/pip" download --disable-pip-version-check --no-binary :all: --no-deps \
    "llama-cpp-python==$VERSION" -d "$VENV/src"
fi
[ -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ] || tar -xzf "$sdist" -C "$VENV/src"

# The converter imports torch at module level (lazy tensors) and transformers (AutoConfig, AutoTokenizer):
# torch is the same exact CPU wheel as the main venv (pip finds it on disk), never another one.
echo "torch==2.13.0" > "$VENV/constraints.txt"
"${pip[@]}" -c "$VENV/constraints.txt" "torch==2.13.0"
"${pip[@]}" -c "$VENV/constraints.txt" numpy safetensors "transformers==4.57.6" "$SRC/vendor/llama.cpp/gguf-py"

# Plain CPU build (native ISA, OpenMP threads, no BLAS/GPU backends), 2 parallel compile jobs.
echo "building llama-cpp-python $VERSION from source (3-10 minutes on 2 cores)..."
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=2 FORCE_CMAKE=1 \
  "${pip[@]}" -c "$VENV/constraints.txt" --no-binary llama-cpp-python "$sdist"

"$VENV/bin/python" -c "import llama_cpp, gguf, torch; print('llama-cpp-python', llama_cpp.__version__, \
'| gguf', gguf.__name__, '| torch', torch.__version__)"
touch "$stamp"
