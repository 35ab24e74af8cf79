#!/usr/bin/env bash
# The wheels bench/gpu.sh installs on the GPU machine: what our package needs beyond the
# machine's image (Python 3.12, torch, transformers, accelerate, peft, pyarrow, ...; see the
# device tool's KINDS.md), pinned to the versions tested here. bitsandbytes (43 MB) does not fit
# the 64 MiB a call carries: its GPU kernels are left out and reported as such.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 platformdirs==4.14.8 \
  torchao==0.18.0 lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
  more_itertools==11.2.1 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4 \
  gguf==0.19.0 compressed-tensors==0.17.0 loguru==0.7.3
python3 -m pip wheel -q --no-deps -w .whl sqlitedict==2.1.0 word2number==1.1 rouge-score==0.1.2
python3 -m pip wheel -q --no-deps -w .whl .
du -sh .whl
