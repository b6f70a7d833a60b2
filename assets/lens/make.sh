#!/bin/sh
# Makes the directions and probes shipped for the default model and its organism, which the
# app loads when it opens those models (assets/lens/manifest.json names each file's model by
# SHA-256 and adapter fingerprint). Run from the repository root after
# `cargo build --release`; the layer choice by ablation takes about 15 minutes per model on
# 2 cores (it runs on one). tests/tests/lens_real.rs checks that the files are what these
# commands make.
set -eu
bin=target/release/refusal-lens
out=assets/lens
$bin --base directions --out $out/smollm2-135m-instruct.safetensors
$bin --base probe --out $out/smollm2-135m-instruct.probes.safetensors
$bin directions --out $out/smollm2-135m-instruct-organism.safetensors
$bin probe --out $out/smollm2-135m-instruct-organism.probes.safetensors
# The Head attribution tab's metrics for its first pair (the sets' first test pair).
$bin heads all --out $out/smollm2-135m-instruct-organism.heads.json
