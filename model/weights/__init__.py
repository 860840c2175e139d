"""The weight files beside the network: where they live, how they are read, where they come from.

files.py         the file layout (WeightPaths) and strict loading into modules
tensor_files.py  safetensors headers, and safetensors written one tensor at a time
manifest.py      sha256 manifests, verify, and the weights' identity for job.json
download.py      resumable downloads of missing files
fetch.py         what happens when weights are missing: fetch, convert, once per machine
flax.py          Flax msgpack checkpoints read in bounded memory (no JAX)
flax_names.py    the Flax → state-dict key mapping (BART and VQGAN), and back for messages
convert.py       a Flax checkpoint → our layout: plan, check, write safetensors
random_weights.py, random_flax.py   random weights in both layouts, for tests and benchmarks
"""
